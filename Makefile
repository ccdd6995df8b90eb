# Two entry points: `make reproduce` (main experiment) and `make test` (the test suite).
# Each creates the virtual environment it needs in .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-all reproduce bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements-lock.txt -e '.[dev,hf,eval]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses=4 tests

test-all: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses=4 -m "" tests

reproduce: $(STAMP)
	$(PY) experiments/compare_objectives.py --config experiments/configs/compare_objectives.py:quick --workdir results/compare_objectives

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
