# The one interface: every target installs the virtual environment on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= dev
DATA ?=
LAUNCHER ?= local

.PHONY: install test lint format bench demo pretrain curves table3 clean

$(BIN)/ssl-kvasir: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch>=2.2,<3" "torchvision>=0.17"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/ssl-kvasir

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check ssl_kvasir experiments bench tests
	$(BIN)/ruff format --check ssl_kvasir experiments bench tests

format: install
	$(BIN)/ruff format ssl_kvasir experiments bench tests
	$(BIN)/ruff check --fix ssl_kvasir experiments bench tests

bench: install
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done
