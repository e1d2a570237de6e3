# The README's commands. Each target sets up .venv first, so every one works on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 is the CPU build that lies on this machine's disk; pinning it here keeps pip from
# pulling a multi-GB CUDA build. pyproject.toml itself only asks for torch>=2.4.
TORCH ?= torch==2.13.0
# The suite runs in this many pytest-xdist workers, a test file per worker at a time (0: in one
# process). Two halve its time on two cores; conftest.py shares the cores out among the workers.
TEST_WORKERS ?= 2

.PHONY: setup demo test test-fast test-accuracy wheel-test lint bench clean

$(BIN)/compressdrop: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH) -e '.[dev]'
	@touch $@

setup: $(BIN)/compressdrop

demo: setup
	$(BIN)/compressdrop train --recipe lenet300-lognormal --data digits --out runs/demo

# Lint (ruff, mypy), the suite, then the wheel test (what CI runs).
test: setup
	$(MAKE) --no-print-directory lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile
	$(MAKE) --no-print-directory wheel-test

# The built wheel in a fresh venv, run from outside the source tree: are its files all there?
wheel-test: setup
	PY='$(PY)' TORCH='$(TORCH)' bash .ci/wheel_test.sh

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not accuracy" -n $(TEST_WORKERS) --dist loadfile

# The long learning runs that `make test` leaves out (marked `accuracy`; pyproject's addopts).
test-accuracy: setup
	$(BIN)/python -m pytest -q -m accuracy -n $(TEST_WORKERS) --dist loadfile

lint: setup
	$(BIN)/ruff check compressdrop tests examples benchmarks cli.py
	$(BIN)/ruff format --check compressdrop tests examples benchmarks cli.py
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
