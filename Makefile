# `make test` and `make demo` work on a fresh machine: they create .venv (unless a virtual
# environment is already active), install torch==2.13.0 first (the CPU build; any other torch
# would pull CUDA packages), then kvx with its dev extras.
VENV ?= .venv
ifdef VIRTUAL_ENV
PYTHON := python
STAMP := $(VIRTUAL_ENV)/.kvx-installed
else
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.kvx-installed
endif
TORCH ?= torch==2.13.0

.PHONY: install lint test demo clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(if $(VIRTUAL_ENV),,$(VENV)/bin/python)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q $(TORCH)
	$(PYTHON) -m pip install -q -e ".[dev]"
	touch $@

install: $(STAMP)

lint: install
	$(PYTHON) -m ruff check kvx tests scripts

test: lint
	$(PYTHON) -m pytest -q

demo: install
	$(PYTHON) -m kvx.cli needle --config configs/needle-demo.yaml --out runs/demo

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
