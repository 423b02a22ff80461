# syntax=docker/dockerfile:1
#
# kvsplice serving image: GPU (the default base) or CPU (a Debian/Python base), one Dockerfile.
#
#   docker build -t kvsplice:0.1.0 .
#   docker run --gpus all -p 8000:8000 -v hf-cache:/cache/huggingface \
#       -e KVSPLICE_MODEL=deepseek-ai/DeepSeek-V2-Lite-Chat -e KVSPLICE_COMPRESSION_RATIO=0.5 kvsplice:0.1.0
#
# Configuration: any KVSPLICE_<FIELD> environment variable, or a mounted YAML file passed as
# arguments (they are appended to `kvsplice serve`):
#   docker run ... -v ./config.yaml:/etc/kvsplice/config.yaml:ro kvsplice:0.1.0 --config /etc/kvsplice/config.yaml
#
# CPU image (what CI builds and runs, tests/test_container_image.py): any Debian/Ubuntu base with
# python3, the CPU torch and no triton:
#   --build-arg BASE_IMAGE=debian:bookworm --build-arg TORCH_VERSION=2.13.0+cpu \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu --build-arg PROJECT_EXTRAS= \
#   --build-arg RUNTIME_BUILD_TOOLS=
#
# Two stages: the build stage makes the venv (torch, then the package); the runtime stage gets the
# venv and nothing else from it: no pip cache, no sources.
#
# Base image: nvidia/cuda *runtime* on Ubuntu 24.04, with torch from PyPI.
# - torch 2.13.0's Linux wheel on PyPI is a CUDA 13 build whose CUDA user-space libraries (cuBLAS,
#   cuDNN, NCCL, ...) arrive as nvidia-*-cu13 wheels, and it pins triton 3.7.1. The base image's
#   CUDA major must match them (13), and the host driver must support CUDA 13 (R580 or newer).
#   For an older driver, build a CUDA 12.8 variant instead:
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# - Not pytorch/pytorch: its tags follow torch releases with a delay and bring conda; with the
#   project pinning torch (Makefile: 2.13.0) a plain venv on the CUDA image keeps one pin for all.
# - runtime, not devel: nothing here compiles CUDA code. Triton brings its own ptxas, but it
#   builds a small C launcher with the system C compiler on first use, so gcc, libc6-dev and the
#   Python headers stay in the GPU image (RUNTIME_BUILD_TOOLS); the CPU image has none.
ARG BASE_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------- build stage
FROM ${BASE_IMAGE} AS build

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
# gpu: triton for the kernels; empty for the CPU image.
ARG PROJECT_EXTRAS=gpu
# pip reads both from the environment: a directory of wheels to prefer (find-links), and a CA
# bundle for an intercepting proxy, e.g. mounted at build time. Unset by default.
ARG PIP_FIND_LINKS
ARG PIP_CERT

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Distribution packages follow the base image's release; pinning their versions would break the
# build at every point update, so they are left unpinned on purpose.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first and on its own layer: it is the largest part and changes far less often than our code.
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
# README*/LICENSE*: pyproject names README.md as the long description; a glob keeps the build
# working while either file is missing (COPY fails only when no source matches at all).
COPY pyproject.toml README* LICENSE* ./
COPY kvsplice ./kvsplice
COPY server ./server
COPY loadtest ./loadtest

# Not editable: the runtime stage gets the installed package, not /src. The torch pin is repeated
# so that resolving the project's dependencies cannot swap it.
# (DL3013 takes ".[extras]" for a package to pin: it is this project's own directory.)
# hadolint ignore=DL3013
RUN pip install ".${PROJECT_EXTRAS:+[$PROJECT_EXTRAS]}" "torch==${TORCH_VERSION}"

# -------------------------------------------------------------------------------- runtime stage
FROM ${BASE_IMAGE}

# gcc, libc6-dev, python3-dev: Triton's launcher is compiled on first use (GPU); empty for CPU.
ARG RUNTIME_BUILD_TOOLS="gcc libc6-dev python3-dev"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates ${RUNTIME_BUILD_TOOLS} \
    && rm -rf /var/lib/apt/lists/*

COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /usr/local/bin/kvsplice-healthcheck

# Unprivileged user. UID 10001 because Ubuntu 24.04 images already have `ubuntu` at 1000; the
# Kubernetes manifests run as the same UID/GID (runAsUser/fsGroup 10001).
RUN chmod 0755 /usr/local/bin/kvsplice-healthcheck \
    && groupadd --system --gid 10001 kvsplice \
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
