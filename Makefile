# The two commands of the README. Both create .venv in the checkout and install the project into it:
# `make demo` the package and what it runs on (no dev tools), `make test` the package with its dev extra.
# Separate stamps: `make test` after `make demo` still installs the dev extra.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: setup demo test lint bench clean

$(BIN)/python:
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found; set PY=/path/to/python3.11+"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip

# torch/torchvision pinned in pyproject; pip resolves them from the local wheel cache where there is one
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP) $(DEV_STAMP)

setup: $(DEV_STAMP)

demo: $(STAMP)
	$(BIN)/slsr demo

# TEST_WORKERS=n: n pytest-xdist workers, whole test files each, heaviest first (tests/conftest.py);
# TEST_WORKERS=0 runs one process. Two by default: on the 2-core reference machine one process leaves
# the CPUs idle while a test waits on a job, a node or a Ray start-up (25.9 min with two workers,
# 31.0 min in one process, the same hour, 2026-11-27); with more cores `make test TEST_WORKERS=4`.
TEST_WORKERS ?= 2
test: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

bench: $(DEV_STAMP)
	$(BIN)/python benchmarks/run_all.py --size small

clean:
	rm -rf $(VENV) runs
