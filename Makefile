# Each target does all of its set-up on a fresh machine: a .venv with torch and tetrad[dev].
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pipefail: a set-up step piped through a filter still fails when the step fails.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# The CPU build of torch 2.13.0 lies on disk on CPU-only machines; pip takes the CUDA build elsewhere.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=

.PHONY: train test lint format bench report-check

$(VENV)/.installed: pyproject.toml
	@echo "make: setting up $(VENV) (once; a few minutes): $(TORCH_SPEC), then tetrad[dev]"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check "$(TORCH_SPEC)" | sed '/^Requirement already satisfied/d'
	$(PY) -m pip install --disable-pip-version-check -e ".[dev]" | sed '/^Requirement already satisfied/d'
	touch $@

train: $(VENV)/.installed
	$(VENV)/bin/tetrad train $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/ruff check tetrad tests scripts benchmarks
	$(VENV)/bin/ruff format --check tetrad tests scripts benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -q $(PYTEST_ARGS)

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix tetrad tests scripts benchmarks
	$(VENV)/bin/ruff format tetrad tests scripts benchmarks

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_train.py

# `tetrad report` opened in headless Chromium (SKIP without one: apt-get install chromium).
report-check: $(VENV)/.installed
	$(PY) scripts/report_check.py $(ARGS)
