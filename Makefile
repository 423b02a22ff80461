# `make test` on a fresh machine: create .venv, install torch and the project, run pytest.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# torch is installed only where none is (scripts/install-torch.sh):
# - A torch that is already there is kept: one in $(VENV), or one that a system or conda $(PYTHON)
#   imports (a GPU host's CUDA build, a container's torch), which $(VENV) then sees through
#   --system-site-packages. Reinstalling would swap a working CUDA build for whatever the index
#   serves. For a torch in another venv, install into that one: make install VENV=path/to/it.
# - On a host with an NVIDIA GPU, $(TORCH_SPEC) from the package index: PyPI's Linux wheel is the
#   CUDA build (torch 2.13: CUDA 13 libraries as nvidia-*-cu13 wheels and triton 3.7.1).
# - Anywhere else the CPU build, asked for explicitly from PyTorch's CPU index, because PyTorch's
#   Linux wheel on PyPI is the CUDA build, about 3 GB to download for nothing. Our CI machines
#   reach PyPI but not that index; their pip is configured with a local wheel store that holds
#   the CPU wheel, which pip then takes for the same request. Where neither gives a torch, the
#   script falls back to $(TORCH_SPEC) from the configured index, with a warning (on an ordinary
#   Linux box, that is the CUDA build).
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# The Triton-interpreter tests use the triton that is installed (a CUDA torch brings its own, which
# is kept). CPU torch brings none: `make tools` then adds this release, the one those tests were
# checked with. Where it cannot be installed they skip, saying so.
TRITON_SPEC ?= triton==3.6.0

.PHONY: install tools test serve clean

$(BIN)/.installed: pyproject.toml scripts/install-torch.sh
	if [ ! -x $(BIN)/python ]; then \
	    if $(PYTHON) -c 'import torch' 2>/dev/null; then $(PYTHON) -m venv --system-site-packages $(VENV); \
	    else $(PYTHON) -m venv $(VENV); fi; \
	fi
	$(BIN)/pip install -q --upgrade pip
	bash scripts/install-torch.sh $(BIN) "$(TORCH_SPEC)" "$(TORCH_CPU_INDEX)" $(PYTHON)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# Tools the tests drive for real: Prometheus/promtool (Debian), hadolint, the Kubernetes schema
# validator, the compose-spec parser, and triton for the interpreter tests. Idempotent; apt needs
# root (it is root in CI).
tools: install
	bash scripts/ci-install-deploy-tools.sh
	$(BIN)/python -c 'import triton' 2>/dev/null || $(BIN)/pip install -q "$(TRITON_SPEC)" || \
	    echo "no $(TRITON_SPEC) for this platform: the Triton-interpreter tests will skip"

test: install tools
	$(BIN)/python -m pytest -q

serve: install
	$(BIN)/kvsplice serve

clean:
	rm -rf $(VENV) build *.egg-info
