# The two entry points of the README: `make demo` and `make test`.
# Both create (or reuse) .venv and install what they need; torch's CPU wheel is pinned first so
# that `higher` (which asks for an unversioned torch) cannot pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0
DATA_DIR ?= $(abspath ../shared/data)
export RAY_USAGE_STATS_ENABLED := 0
export EDGEMETA_DATA_DIR ?= $(DATA_DIR)
# glibc would unmap freed activations and fault them back in every meta-step (~0.5 s of kernel
# time per Omniglot step here): keep big blocks mapped (see docs/BENCHMARKS.md).
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 1073741824
export MALLOC_TOP_PAD_ ?= 268435456

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgemeta demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf runs .pytest_cache
