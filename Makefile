# The two entry points of the README: `make demo` and `make test`.
# Both create (or reuse) .venv and install what they need; torch is pinned and installed first so
# that `higher` (which asks for an unversioned torch) cannot pull another build (see TORCH_INDEX).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0
# Where torch comes from. Empty (the default): pip's configured indexes, i.e. PyPI's build (CUDA on
# Linux x86-64) unless a local wheel cache provides another (as on the CI machines, whose cache
# holds the CPU build). https://download.pytorch.org/whl/cpu: the CPU build, everywhere;
# https://download.pytorch.org/whl/cu128 (or another CUDA tag): that CUDA build.
TORCH_INDEX ?=
DATA_DIR ?= $(abspath ../shared/data)
export RAY_USAGE_STATS_ENABLED := 0
# The shared data folder where it exists (a fresh clone has none: `make demo` then fetches
# Omniglot into the user cache, see experiments/demo.py).
export EDGEMETA_DATA_DIR ?= $(wildcard $(DATA_DIR))
# glibc would unmap freed activations and fault them back in every meta-step (~0.5 s of kernel
# time per Omniglot step here): keep big blocks mapped (see docs/BENCHMARKS.md).
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 1073741824
export MALLOC_TOP_PAD_ ?= 268435456

.PHONY: venv demo test test-long lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgemeta demo

test: $(STAMP)
	scripts/ensure_chromium.sh
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q tests -m "not long"

# The longest end-to-end checks (a SIGKILLed driver, a SIGKILLed site raylet, serving beside
# busy cores, onboarding a site): CI runs them after `make test`.
test-long: $(STAMP)
	$(BIN)/python -m pytest -q tests -m long

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf runs .pytest_cache
