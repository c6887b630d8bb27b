# The README's two newcomer commands are `make demo` and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	@test -x /usr/bin/chromium || (apt-get update -q && apt-get install -y -q chromium)  # browser tests

demo: setup
	$(BIN)/aca demo

# Lint is part of the tests: CI fails on a ruff or mypy error as on a failing test.
test: setup lint
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check .
	$(BIN)/mypy engine

bench: setup
	$(BIN)/python bench/attention.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
