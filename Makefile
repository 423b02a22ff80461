# `make test` on a fresh machine: create .venv, install the CPU torch wheel and the project, run pytest.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch: this project's tests and CI run on CPU-only machines, and the CUDA wheel is
# several GB. On a GPU host install the CUDA build of torch first and then `pip install -e .[gpu]`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install tools test serve clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# Tools the tests drive for real: Prometheus/promtool (Debian), hadolint, the Kubernetes schema
# validator, the compose-spec parser. Idempotent; apt needs root (it is root in CI).
tools: install
	bash scripts/ci-install-deploy-tools.sh

test: install tools
	$(BIN)/python -m pytest -q

serve: install
	$(BIN)/kvsplice serve

clean:
	rm -rf $(VENV) build *.egg-info
