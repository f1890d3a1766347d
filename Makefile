# Every target creates .venv and installs what it needs, so a fresh clone works.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned and installed first: a bare `torch` requirement with no torch installed
# pulls a multi-GB CUDA build. pyproject keeps the looser `torch>=2.4`.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install quickstart test bench bench-optimum clean

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

# Two passes: the tests on pytest-xdist workers (one torch thread each, so they do not fight
# over the cores), then the `serial` tests alone (they start ranks of their own that need the
# cores). A plain `pytest` still runs everything in one process.
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) -m "not slow and not gpu and not serial"
	$(BIN)/python -m pytest -m "serial and not slow and not gpu"

bench: install
	$(BIN)/python benchmarks/run_all.py

# Optimum's ORTModelForCausalLM (optimum-onnx pins transformers<4.58) cannot live beside the
# project's transformers, so its benchmark gets its own venv. torch first for the same reason as
# above; bigmodel without extras (transformers is only in its dev extra), so pip's resolver lets
# optimum-onnx choose the transformers.
OPT_VENV := .venv-optimum
OPT_STAMP := $(OPT_VENV)/.installed

$(OPT_STAMP): pyproject.toml
	$(PY) -m venv $(OPT_VENV)
	$(OPT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OPT_VENV)/bin/pip install --quiet $(TORCH)
	$(OPT_VENV)/bin/pip install --quiet 'optimum-onnx[onnxruntime]' -e .
	touch $(OPT_STAMP)

bench-optimum: $(OPT_STAMP)
	$(OPT_VENV)/bin/python benchmarks/generate_optimum.py

clean:
	rm -rf $(VENV) $(OPT_VENV) runs build *.egg-info src/*.egg-info
