# Two entry points: `make demo` (the main job) and `make test`. Each creates .venv if missing and installs
# the package into it; re-installs only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean help

help:  ## list targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)  ## create .venv and install nanochat with test extras

demo: $(STAMP)  ## the whole pipeline on CPU: tokenizer -> base -> mid -> SFT -> RL -> report card (~18 min)
	$(VENV)/bin/nanochat train experiment=speedrun_cpu

test: $(STAMP)  ## run the test suite (CPU, a few minutes)
	$(PY) -m pytest

lint: $(STAMP)  ## ruff: formatting (check only) and lint, line length 120
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

bench: $(STAMP)  ## every hot path's benchmark (~10 min on 2 CPU cores; NANOCHAT=<checkout> adds the side-by-side)
	$(PY) bench/run_all.py $(if $(NANOCHAT),--nanochat $(NANOCHAT))

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info src/*.egg-info
