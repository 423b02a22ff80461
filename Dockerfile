# syntax=docker/dockerfile:1
#
# kvsplice serving image (GPU).
#
#   docker build -t kvsplice:0.1.0 .
#   docker run --gpus all -p 8000:8000 -v hf-cache:/cache/huggingface \
#       -e KVSPLICE_MODEL=deepseek-ai/DeepSeek-V2-Lite-Chat -e KVSPLICE_COMPRESSION_RATIO=0.5 kvsplice:0.1.0
#
# Configuration: any KVSPLICE_<FIELD> environment variable, or a mounted YAML file passed as
# arguments (they are appended to `kvsplice serve`):
#   docker run ... -v ./config.yaml:/etc/kvsplice/config.yaml:ro kvsplice:0.1.0 --config /etc/kvsplice/config.yaml
#
# Base image: nvidia/cuda *runtime* on Ubuntu 24.04, with torch from PyPI.
# - torch 2.13.0's Linux wheel on PyPI is a CUDA 13 build whose CUDA user-space libraries (cuBLAS,
#   cuDNN, NCCL, ...) arrive as nvidia-*-cu13 wheels, and it pins triton 3.7.1. The base image's
#   CUDA major must match them (13), and the host driver must support CUDA 13 (R580 or newer).
#   For an older driver, build a CUDA 12.8 variant instead:
#     --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# - Not pytorch/pytorch: its tags follow torch releases with a delay and bring conda; with the
#   project pinning torch (Makefile: 2.13.0) a plain venv on the CUDA image keeps one pin for all.
# - runtime, not devel: nothing here compiles CUDA code. Triton brings its own ptxas, but it
#   builds a small C launcher with the system C compiler on first use, so gcc, libc6-dev and the
#   Python headers are installed below.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Distribution packages follow the base image's Ubuntu release; pinning their versions would
# break the build at every Ubuntu point update, so they are left unpinned on purpose.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first and on its own layer: it is several GB and changes far less often than our code.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
# README*/LICENSE*: pyproject names README.md as the long description; a glob keeps the build
# working while either file is missing (COPY fails only when no source matches at all).
COPY pyproject.toml README* LICENSE* ./
COPY kvsplice ./kvsplice
COPY server ./server
COPY loadtest ./loadtest
COPY deploy/docker/healthcheck.py /usr/local/bin/kvsplice-healthcheck

# Not editable: the image carries the installed package, /src is removed afterwards.
# The torch pin is repeated so that resolving the project's dependencies cannot swap it.
RUN pip install --no-cache-dir "./[gpu]" "torch==${TORCH_VERSION}" \
    && chmod 0755 /usr/local/bin/kvsplice-healthcheck \
    && rm -rf /src

# Unprivileged user. UID 10001 because Ubuntu 24.04 images already have `ubuntu` at 1000; the
# Kubernetes manifests run as the same UID/GID (runAsUser/fsGroup 10001).
RUN groupadd --system --gid 10001 kvsplice \
    && useradd --system --uid 10001 --gid kvsplice --create-home --home-dir /home/kvsplice kvsplice \
    && mkdir -p /cache/huggingface /etc/kvsplice \
    && chown -R kvsplice:kvsplice /cache/huggingface

# Hub downloads (model weights, tokenizers) go to HF_HOME: keep it on a volume so a restart or a
# second container does not download tens of GB again.
ENV HF_HOME=/cache/huggingface \
    KVSPLICE_HOST=0.0.0.0 \
    KVSPLICE_PORT=8000
VOLUME ["/cache/huggingface"]

# Numeric, so that Kubernetes can check runAsNonRoot without resolving the name.
USER 10001:10001
WORKDIR /home/kvsplice
EXPOSE 8000

# /health answers 200 while the engine loop is alive. Loading a large model takes minutes, so the
# start period is long; the check itself uses the image's Python (no curl in the image).
HEALTHCHECK --interval=30s --timeout=10s --start-period=900s --retries=3 \
    CMD ["kvsplice-healthcheck"]

ENTRYPOINT ["kvsplice", "serve"]
CMD []
