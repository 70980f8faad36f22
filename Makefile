# The one interface: every target installs the virtual environment on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,dev
DATA ?=
LAUNCHER ?= local

.PHONY: install test lint typecheck format bench demo pretrain status curves table3

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

# mypy on ssl_kvasir/ at the strictness pyproject.toml's [tool.mypy] states.
typecheck: install
	$(BIN)/mypy

format: install
	$(BIN)/ruff format ssl_kvasir experiments bench tests
	$(BIN)/ruff check --fix ssl_kvasir experiments bench tests

# make bench runs every benchmark in bench/ in its quick form (make bench BENCH_ARGS= runs the full ones) and ends
# with each one's closing lines (one, or one per system a comparison decides), `<benchmark>: <what> = <value> (target <op> <target>: met)` or `NOT met`. It fails
# only when a benchmark fails to run; a missed target is reported, not an error.
BENCH_ARGS ?= --quick
bench: install
	@lines=$$(mktemp); failed=0; \
	for b in bench/bench_*.py; do \
		echo "== $$b"; out=$$(mktemp); \
		{ PYTHONUNBUFFERED=1 $(BIN)/python $$b $(BENCH_ARGS) 2>&1; echo $$? > $$out.rc; } | tee $$out; \
		rc=$$(cat $$out.rc); \
		found=$$(grep -E '^[a-z_]+: .+ = .+ \(target .+\)$$' $$out); \
		if [ "$$rc" != 0 ]; then echo "$$b: FAILED (exit $$rc)" >> $$lines; failed=1; \
		elif [ -z "$$found" ]; then echo "$$b: no closing line" >> $$lines; failed=1; \
		else echo "$$found" >> $$lines; fi; \
		rm -f $$out $$out.rc; \
	done; \
	echo "== closing lines"; cat $$lines; rm -f $$lines; exit $$failed

# ---- The label-efficiency study (README: "Label-efficiency study") ----------------------------------------
# make pretrain DATA=DIR [SPLIT=FILE] [CACHE=DIR] [OUT=runs] [LAUNCHER=local|slurm]
#              [PARTITION=.. ACCOUNT=.. GPUS=1 NODES=1 TIME=1440 MEM=.. CPUS=..] [ARGS="extra overrides"]
#              [WAIT=0: submit (slurm) or start in the background (local) and return]
# make status [OUT=runs]      one line per point: done, running, queued, failed, missing
# make curves [OUT=runs] [WANDB=0: no W&B run]
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

WAIT ?= 1
WANDB ?= 1
NO_WAIT = $(filter 0 false no,$(WAIT))
PRETRAIN = $(BIN)/python experiments/sweep.py hydra/launcher=$(LAUNCHER) data.root=$(DATA) data.split_file=$(SPLIT) \
	sweep_root=$(OUT) $(if $(CACHE),data.cache=$(CACHE)) \
	$(if $(filter slurm,$(LAUNCHER)),$(SLURM_OVERRIDES) hydra.launcher.wait=$(if $(NO_WAIT),false,true)) $(ARGS)

pretrain: install
	@test -n "$(DATA)" || { echo "usage: make pretrain DATA=DIR [SPLIT=FILE] [CACHE=DIR] [OUT=runs] [LAUNCHER=local|slurm] [WAIT=0] [PARTITION=.. ACCOUNT=.. GPUS=.. NODES=.. TIME=.. MEM=.. CPUS=..] [ARGS=\"overrides\"]"; exit 2; }
ifeq ($(if $(NO_WAIT),$(LAUNCHER),),local)
	@mkdir -p $(OUT)
	@nohup $(PRETRAIN) >> $(OUT)/pretrain.log 2>&1 & echo "sweep started in the background (pid $$!), log $(OUT)/pretrain.log; make status OUT=$(OUT)"
else
	$(PRETRAIN)
endif

status: install
	@$(BIN)/ssl-kvasir status $(OUT)

curves: install
	$(BIN)/ssl-kvasir curves $(OUT) --out $(OUT)/curves $(if $(filter 0 false no,$(WANDB)),,--wandb)

demo: install
	$(BIN)/python experiments/demo.py

# ---- The paper's Table 3 (README: "The paper's protocol and baselines") -----------------------------------
# make table3 DATA=DIR [SPLIT=FILE] [CACHE=DIR] [OUT=runs] [LAUNCHER=local|slurm] [... as for pretrain]
# The five systems x the two folds through the same sweep machinery, then the side-by-side report.
TABLE3 = table3_resnet50,table3_resnet152,table3_densenet161,table3_resnet152_densenet161,table3_resnet152_densenet161_mlp
table3: install
	@test -n "$(DATA)" || { echo "usage: make table3 DATA=DIR [SPLIT=FILE] [CACHE=DIR] [OUT=runs] [LAUNCHER=local|slurm] [ARGS=\"overrides\"]"; exit 2; }
	$(BIN)/python experiments/sweep.py hydra/launcher=$(LAUNCHER) data.root=$(DATA) data.split_file=$(SPLIT) \
		sweep_root=$(OUT)/table3 experiment=$(TABLE3) method=supervised data.label_fraction=1.0 data.fold=0,1 \
		$(if $(CACHE),data.cache=$(CACHE)) $(if $(filter slurm,$(LAUNCHER)),$(SLURM_OVERRIDES)) $(ARGS)
	$(BIN)/ssl-kvasir report $(OUT)/table3 --out $(OUT)/table3/report --split-file $(SPLIT)
