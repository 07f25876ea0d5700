# The two commands of the README:
#   make run    set everything up, run the daemon on its default socket
#   make test   set everything up, run ruff, mypy and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
# pytest's worker processes (pytest-xdist): one per core; 0 runs the suite
# in this one process (`make pytest PYTEST_WORKERS=0`).
PYTEST_WORKERS ?= auto

.PHONY: run test lint typecheck pytest bench clean

# --no-compile: a module is byte-compiled when it is first imported, not
# every module of every package at install (most of what the test tools
# bring is never imported here).
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile

# What running needs: the package and its three dependencies. setup.py
# builds the hit path's C extension (shadowd/_hotcalls.c) in place.
$(VENV)/.installed: pyproject.toml setup.py shadowd/_hotcalls.c
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

# What testing adds: pytest (with pytest-trio and pytest-xdist), hypothesis,
# ruff, mypy, build. One install of the package with them, which is also
# all that running needs (so .installed is done too): not a second build of
# the package after the first.
$(VENV)/.installed-test: pyproject.toml setup.py shadowd/_hotcalls.c
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[test]'
	touch $(VENV)/.installed $@

run: $(VENV)/.installed
	$(BIN)/shadowd serve $(ARGS)

test: lint typecheck pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check shadowd client tests
	$(BIN)/ruff format --check shadowd client tests

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

pytest: $(VENV)/.installed-test
	$(BIN)/pytest -n $(PYTEST_WORKERS) $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
