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
	sh .ci/typecheck

test: deps lint
	$(BIN)/pytest -q
