# Quickstart: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint gpu-check demo bench cuda-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

# torch is pinned to the CPU wheel available offline here; an unpinned torch pulls GBs of CUDA.
$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard csrc/*)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q setuptools wheel ninja
	$(BIN)/pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Compile every CUDA source to an object for sm_90 so CUDA code cannot rot without a GPU.
cuda-check: $(STAMP)
	@if [ -x tools/nvcc_check.sh ]; then PATH=$(BIN):$$PATH tools/nvcc_check.sh; else echo "no tools/nvcc_check.sh"; fi

test: install cuda-check
	$(BIN)/python -m pytest tests -q

# ruff (pyflakes, bugbear, import order, pycodestyle; settings in pyproject.toml [tool.ruff])
lint: install
	$(BIN)/ruff check lvr_engine tests benchmarks tools

# On a machine with a CUDA GPU and a CUDA torch (no venv, no network): build in place, CUDA/Triton tests, GPU
# benchmarks; logs under $$OUT or gpu_check_out/. Without a GPU it says so and exits 0.
gpu-check:
	tools/gpu_check.sh

demo: install
	$(BIN)/lvr demo

bench: install
	$(BIN)/python -m pytest benchmarks/ --benchmark-only

clean:
	rm -rf build *.egg-info lvr_engine/*.so
