# The two commands a new user runs: `make demo` and `make test`.
# Both create the virtual environment on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint install-check bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest

demo: setup
	$(VENV)/bin/taskray demo

lint: setup
	$(VENV)/bin/ruff check taskray api tests bench
	$(VENV)/bin/ruff format --check taskray api tests bench
	$(VENV)/bin/mypy taskray api

# The wheel without extras in a fresh virtual environment: what `pip install taskray` gets.
install-check:
	PYTHON=$(PYTHON) .ci/install-check

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) bench/store.py
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
