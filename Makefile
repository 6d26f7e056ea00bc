# memcast developer commands. `make demo` is the first thing to try; `make test` is what CI runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?=
CHECKPOINTS ?= checkpoints
PORT ?= 8765
PYTEST_ARGS ?=

.PHONY: install test test-fast lint typecheck check demo bench results clean

install: $(VENV)/.installed

# torch is pinned to 2.13.0 (CPU build) through constraints.txt: an unpinned torch pulls a
# multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[train,dev,bench]"
	touch $@

# the whole suite, the `slow` tier (processes, browsers, benchmark scripts) included
test: install
	$(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)

# without the `slow` tier: the loop to run while changing code
test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# what CI runs, in order
check: lint typecheck test

demo: install
	DATA="$(DATA)" CHECKPOINTS="$(CHECKPOINTS)" PORT="$(PORT)" BIN="$(BIN)" bash docker/demo.sh

bench: install
	$(BIN)/python -m bench.run_all --quick

# docs/results.md: every accuracy table, full test splits (JOBS processes; about 1 h on 2 cores)
results: install
	$(BIN)/python -m bench.results --jobs $(or $(JOBS),2)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info
