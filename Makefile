# `make demo` and `make test` each set up .venv themselves. TORCH_SPEC pins torch (never an unpinned, CUDA-pulling
# install on CPU machines); set it to a CUDA build on GPU machines, e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test test-fast check-install lint clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	touch $@

$(VENV)/.base: $(VENV)/.torch setup.cfg pyproject.toml
	$(PIP) install -q -e .
	touch $@

# The linters only (no test extras): `make lint` runs before `make check-install`, which needs the runtime install alone.
$(VENV)/.lint: $(VENV)/.base
	$(PIP) install -q -e ".[lint]"
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) install -q -e ".[dev]"
	# megatron-core only to check that its IndexedDataset reads our shards (its own deps are not needed for that)
	$(PIP) install -q --no-deps "megatron-core>=0.16,<0.17"
	touch $@

demo: $(VENV)/.base
	PATH="$(abspath $(VENV))/bin:$$PATH" bash launch/demo.sh

# The runtime install alone (no dev extras) prepares every source type; .ci/run calls it before `make test` adds
# the extras. Needs Debian's python3.11-doc and cxref-doc for its real inputs.
check-install: $(VENV)/.base
	$(PY) tests/install_check.py

# ruff (lint rules and formatting) and mypy, configured in pyproject.toml
lint: $(VENV)/.lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: $(VENV)/.dev
	$(PY) -m pytest -q -ra --durations=25 tests

# In-process tests only (no subprocess, no launcher; enforced by tests/unit/conftest.py): under a minute on 2 cores.
test-fast: $(VENV)/.dev
	$(PY) -m pytest -q -ra tests/unit

clean:
	rm -rf runs data .pytest_cache
