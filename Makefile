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

# ---- The label-efficiency study (README: "Label-efficiency study") ----------------------------------------
# make pretrain DATA=DIR [SPLIT=FILE] [CACHE=DIR] [OUT=runs] [LAUNCHER=local|slurm]
#              [PARTITION=.. ACCOUNT=.. GPUS=1 NODES=1 TIME=1440 MEM=.. CPUS=..] [ARGS="extra overrides"]
# make curves [OUT=runs]
SPLIT ?= $(DATA)/2_fold_split.csv
CACHE ?=
OUT ?= runs
ARGS ?=
PARTITION ?=
ACCOUNT ?=
GPUS ?= 1
NODES ?= 1
TIME ?= 1440
MEM ?=
CPUS ?=
SLURM_OVERRIDES = hydra.launcher.gpus_per_node=$(GPUS) hydra.launcher.tasks_per_node=$(GPUS) \
	hydra.launcher.nodes=$(NODES) hydra.launcher.timeout_min=$(TIME) \
	$(if $(PARTITION),hydra.launcher.partition=$(PARTITION)) $(if $(ACCOUNT),hydra.launcher.account=$(ACCOUNT)) \
	$(if $(MEM),hydra.launcher.mem_gb=$(MEM)) $(if $(CPUS),hydra.launcher.cpus_per_task=$(CPUS))

pretrain: install
	@test -n "$(DATA)" || { echo "usage: make pretrain DATA=DIR [SPLIT=FILE] [CACHE=DIR] [OUT=runs] [LAUNCHER=local|slurm] [PARTITION=.. ACCOUNT=.. GPUS=.. NODES=.. TIME=.. MEM=.. CPUS=..] [ARGS=\"overrides\"]"; exit 2; }
	$(BIN)/python experiments/sweep.py hydra/launcher=$(LAUNCHER) data.root=$(DATA) data.split_file=$(SPLIT) \
		sweep_root=$(OUT) $(if $(CACHE),data.cache=$(CACHE)) $(if $(filter slurm,$(LAUNCHER)),$(SLURM_OVERRIDES)) $(ARGS)

curves: install
	$(BIN)/ssl-kvasir curves $(OUT) --out $(OUT)/curves

demo: install
	$(BIN)/python experiments/demo.py
