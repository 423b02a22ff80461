#!/usr/bin/env bash
# Install torch into a virtual environment only when it cannot import one (see the Makefile).
#
#   scripts/install-torch.sh VENV_BIN TORCH_SPEC CPU_INDEX_URL [BASE_PYTHON]
#
# - A torch the venv already imports is kept as it is: a GPU host's CUDA build must not be swapped.
# - A host with an NVIDIA GPU gets TORCH_SPEC from the configured package index (PyPI's Linux wheel
#   is the CUDA build).
# - Any other host gets the CPU build from CPU_INDEX_URL (PyPI's Linux wheel would be the CUDA build,
#   several GB that a CPU cannot use). Where that index cannot be reached, TORCH_SPEC comes from the
#   configured index instead, with a warning: a machine whose pip is set up with a local store of
#   CPU wheels (our CI) gets its CPU build there; an ordinary Linux box would get the CUDA build.
set -euo pipefail

bin=$1 spec=$2 cpu_index=$3 base_python=${4:-}

describe() {
    "$bin/python" - <<'PY'
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
PY
}

if "$bin/python" -c 'import torch' 2>/dev/null; then
    echo "install-torch: keeping the installed $(describe)"
    exit 0
fi
if [ -n "$base_python" ] && "$base_python" -c 'import torch' 2>/dev/null; then
    # A venv sees the packages of a system or conda Python, not those of another venv.
    echo "install-torch: WARNING: $base_python has a torch that this venv cannot see (it lives in" \
         "another virtual environment); to use it, install there instead: make install VENV=<that venv>" >&2
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install-torch: NVIDIA GPU found: $spec from the package index (on Linux, the CUDA build)"
    "$bin/pip" install -q "$spec"
elif echo "install-torch: no NVIDIA GPU: the CPU build of $spec from $cpu_index" &&
    # One retry: an unreachable index then costs seconds, not minutes of back-off per package.
    "$bin/pip" install -q --retries 1 --index-url "$cpu_index" "$spec"; then
    :
else
    echo "install-torch: WARNING: $cpu_index could not be used; $spec from the configured index" \
         "instead, which on an ordinary Linux x86_64 box is the CUDA build (about 3 GB to download)." \
         "Set TORCH_CPU_INDEX to a reachable copy of the CPU index, or install torch first." >&2
    "$bin/pip" install -q "$spec"
fi
echo "install-torch: installed $(describe)"
