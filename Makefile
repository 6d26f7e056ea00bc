# memcast developer commands. `make demo` is the first thing to try; `make test` is what CI runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?=
CHECKPOINTS ?= checkpoints
PORT ?= 8765

.PHONY: install test lint demo bench clean

install: $(VENV)/.installed

# torch is pinned to 2.13.0 (CPU build) through constraints.txt: an unpinned torch pulls a
# multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,bench]"
	touch $@

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: install
	DATA="$(DATA)" CHECKPOINTS="$(CHECKPOINTS)" PORT="$(PORT)" BIN="$(BIN)" bash docker/demo.sh

bench: install
	$(BIN)/python bench/run_all.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
