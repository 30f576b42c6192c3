# `make run`: the built-in default pipeline; `make test`: the test suite (fast, e2e excluded);
# `make test-e2e`: the default recipe end to end against its targets. All create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-e2e setup clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m vitslim run

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

test-e2e: $(STAMP)
	$(BIN)/python -m pytest -q -m e2e

clean:
	rm -rf $(VENV) runs .pytest_cache
