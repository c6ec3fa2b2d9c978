# Two commands do all the set-up on a fresh clone (Python 3.11):
#   make example   creates .venv, installs the pinned environment, runs the main example
#   make test      the same set-up, then the test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: example test lint bench

$(STAMP): pyproject.toml requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.txt -e .
	touch $(STAMP)

example: $(STAMP)
	$(PY) examples/parameter_vs_buffer.py

test: $(STAMP)
	$(PY) -m pytest -q -n 2

lint: $(STAMP)
	$(VENV)/bin/ruff check flax_registry tests examples benchmarks
	$(VENV)/bin/ruff format --check flax_registry tests examples benchmarks
	$(VENV)/bin/mypy flax_registry examples benchmarks
