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

# The lowest supported transformers release and one in the middle of the range (kvx/compat.py says
# what differs between them); `make test` runs on whatever pip installs, the newest.
COMPAT_RELEASES ?= 5.3.0 5.14.1
COMPAT_TESTS ?= tests/test_equivalence.py tests/test_state.py tests/test_batch.py tests/test_memory.py \
	tests/test_chunked.py tests/test_compat.py tests/test_compose.py tests/storage tests/methods \
	tests/patches/test_coverage.py

.PHONY: install lint test test-compat coverage demo clean

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

# the fast subset on each release of COMPAT_RELEASES, each in its own environment (.venv-compat/)
test-compat:
	@set -e; for release in $(COMPAT_RELEASES); do \
		env=.venv-compat/transformers-$$release; \
		if [ ! -f $$env/.kvx-installed ]; then \
			python3 -m venv $$env; \
			$$env/bin/python -m pip install -q --upgrade pip; \
			$$env/bin/python -m pip install -q $(TORCH); \
			$$env/bin/python -m pip install -q -e ".[dev]" "transformers==$$release"; \
			touch $$env/.kvx-installed; \
		fi; \
		echo "== transformers $$release"; \
		$$env/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS); \
	done

# every causal-LM model type of the installed transformers (slower than `make test`)
coverage: install
	KVX_COVERAGE=all $(PYTHON) -m pytest -q -s tests/patches/test_coverage.py

demo: install
	$(PYTHON) -m kvx.cli needle --model kvx/assets/needle-llama-keys --config configs/needle-demo.yaml --out runs/demo

clean:
	rm -rf $(VENV) .venv-compat .pytest_cache *.egg-info
