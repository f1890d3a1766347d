# Every target creates .venv and installs what it needs, so a fresh clone works.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned and installed first: a bare `torch` requirement with no torch installed
# pulls a multi-GB CUDA build. pyproject keeps the looser `torch>=2.4`.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install quickstart test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(BIN)/bigmodel run examples/recipes/digits-mlp.toml --out runs/quickstart --overwrite

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
