# Two commands on a fresh machine: `make serve` runs the loop, `make test` runs the tests.
# Both create .venv first; torch is pinned to the CPU-sized 2.13.0 (unpinned pulls gigabytes of CUDA).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

.PHONY: install serve test bench
install: $(STAMP)

serve: $(STAMP)
	$(BIN)/ratchet serve $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/trainer.py
