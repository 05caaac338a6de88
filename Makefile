# Two entry points: `make demo` (the main job) and `make test` (lint, types, the whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint deps

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/labmeter demo

deps:
	sh .ci/debian-deps

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	sh .ci/typecheck

# The suite in two parts: what tolerates sharing the CPU on $(TEST_WORKERS) pytest-xdist workers, then
# the timing-sensitive modules (marker `serial`, tests/conftest.py) alone; both parts always run.
TEST_WORKERS ?= 3

test: deps lint
	@$(BIN)/pytest -q -n $(TEST_WORKERS) -m 'not serial'; a=$$?; \
	$(BIN)/pytest -q -p no:xdist -m serial; b=$$?; \
	test $$a -eq 0 -a $$b -eq 0
