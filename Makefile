# Everything a fresh machine needs: `make test` and `make demo` create .venv and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; set TORCH_SPEC= to keep whatever torch the venv already has.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test lint demo demo-quick bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check fusion_train varm_merge tests bench
	$(BIN)/ruff format --check fusion_train varm_merge tests bench

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/fusion-train demo $(DEMO_ARGS)

demo-quick: $(STAMP)
	$(BIN)/fusion-train demo --quick $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/represent.py
	$(BIN)/python bench/align.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/merge.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
