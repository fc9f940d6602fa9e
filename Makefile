# The two commands: `make demo` and `make test`. Both build .venv from scratch when it is missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test
DEMO_DIR ?= runs/demo

.PHONY: demo test lint audit bench clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or run: make PYTHON=/path/to/python3.11 ...)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m service.demo --out $(DEMO_DIR)

test: $(STAMP)
	bash tools/system_deps.sh
	$(BIN)/ruff check distill workers service tests bench tools
	$(BIN)/ruff format --check distill workers service tests bench tools
	$(BIN)/python tools/audit.py
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check distill workers service tests bench tools
	$(BIN)/ruff format --check distill workers service tests bench tools

audit: $(STAMP)
	$(BIN)/python tools/audit.py --strict

bench: $(STAMP)
	$(BIN)/python bench/train_infer_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
