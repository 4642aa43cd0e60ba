# Two entry points: `make demo` (the main job) and `make test`. Each creates .venv if missing and installs
# the package into it; re-installs only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Real text for the demo and the real-data tests when the shared datasets sit beside the checkout.
SHARED_TEXT := $(abspath ../shared/data/pretrain_text)
ifneq ($(wildcard $(SHARED_TEXT)),)
export NANOCHAT_PRETRAIN_TEXT ?= $(SHARED_TEXT)
endif

.PHONY: demo test install clean help

help:  ## list targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)  ## create .venv and install nanochat with test extras

demo: $(STAMP)  ## text -> tokenizer -> d4 base -> mid -> SFT on CPU -> chat answers (~9.5 min)
	$(PY) -m nanochat.demo

test: $(STAMP)  ## run the test suite (CPU, a few minutes)
	$(PY) -m pytest

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info src/*.egg-info
