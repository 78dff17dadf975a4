# pegrid: the two set-up commands are `make install` and `make test` (see README).
PYTHON ?= python
TORCH_VERSION ?= 2.13.0
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install train test test-fast test-gpu gpu-check lint wandb-sync prepare eval bench bench-gpu

help:  ## list the targets (a bare `make` installs nothing)
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-z-]*:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install:  ## CPU torch first (a plain `torch` pulls GBs of CUDA), then the project with its dev + chat + eval extras
	$(PYTHON) -m pip install "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -e ".[dev,chat,eval]"

train:  ## python -m src.train with Hydra overrides in ARGS, e.g. make train ARGS="model/pe=fire"
	$(PYTHON) -m src.train $(ARGS)

prepare:  ## tokenise a dataset into shards, e.g. make prepare ARGS="data=fineweb_edu"
	$(PYTHON) -m src.data.prepare $(ARGS)

eval:  ## evaluate a checkpoint, e.g. make eval ARGS="ckpt=outputs/<run>"
	$(PYTHON) -m src.eval $(ARGS)

bench:  ## CPU quick benchmark vs HF GPT-2 (outputs/bench/); the GPU grid: make bench ARGS="--out outputs/bench-gpu"
	$(PYTHON) -m src.benchmark $(if $(ARGS),$(ARGS),--quick)

BENCH_GPU_OUT ?= outputs/bench-gpu
bench-gpu:  ## the GPU targets (docs/PERFORMANCE.md): 124M at T=1024 and T=8192, compiled, bf16, then the check
	@# a failed row (e.g. an OOM) is in bench.json: go on to the check, whose exit status is make's
	-$(PYTHON) -m src.benchmark --pes learned alibi kerple fire --attentions flash --context 1024 --batch 16 \
		--compile on --profile --out $(BENCH_GPU_OUT)/t1024
	-$(PYTHON) -m src.benchmark --pes learned --attentions flash linformer --context 8192 --batch 1 \
		--compile on --profile --out $(BENCH_GPU_OUT)/t8192
	$(PYTHON) -m src.benchmark.targets $(BENCH_GPU_OUT)/t1024/bench.json $(BENCH_GPU_OUT)/t8192/bench.json \
		--out $(BENCH_GPU_OUT)/targets.md

test:  ## the whole suite, slow tests included (what CI runs)
	$(PYTHON) -m pytest -q --durations=10

test-fast:  ## the suite without the tests marked slow
	$(PYTHON) -m pytest -q -m "not slow"

test-gpu:  ## the tests marked cuda (tests/test_cuda.py and others): skipped, with the reason, without a GPU
	$(PYTHON) -m pytest -q -m cuda -rs

GPU_CHECK_OUT ?= outputs/gpu-check
gpu-check:  ## the first command on a 1-GPU machine (<= 9 min): CUDA tests, bench-gpu, 20 steps of every combination at 124M -> outputs/gpu-check/report.md
	$(PYTHON) scripts/gpu_check.py --out $(GPU_CHECK_OUT) $(ARGS)

lint:  ## ruff over every Python file of the project
	$(PYTHON) -m ruff check src tests analysis sweeps scripts app.py

wandb-sync:  ## upload the offline W&B runs under outputs/ not synced yet (ARGS="--runs DIR --dry-run"; needs `wandb login`)
	$(PYTHON) scripts/wandb_sync.py $(ARGS)

# ---------------------------------------------------------------------------------------------- sweeps
# make sweep [SWEEP=grid] [PREFLIGHT=1] [PARTITION=gpu] [ACCOUNT=proj] [GPUS_PER_NODE=8, 0: CPU jobs] [NODES=1] [TIME_MIN=1440]
#            [SBATCH_EXTRA='{constraint:a100}'] [ARGS="more Hydra overrides / --dry-run / --rerun-stale"]
#            (docs/SWEEPS.md)
SWEEP ?= grid
PARTITION ?=
ACCOUNT ?=
GPUS_PER_NODE ?=
NODES ?=
TIME_MIN ?=
SBATCH_EXTRA ?=
SWEEP_LAUNCHER_OVERRIDES = \
	$(if $(PARTITION),hydra.launcher.partition=$(PARTITION)) \
	$(if $(ACCOUNT),hydra.launcher.account=$(ACCOUNT)) \
	$(if $(GPUS_PER_NODE),hydra.launcher.gpus_per_node=$(GPUS_PER_NODE) hydra.launcher.tasks_per_node=$(GPUS_PER_NODE)) \
	$(if $(NODES),hydra.launcher.nodes=$(NODES)) \
	$(if $(TIME_MIN),hydra.launcher.timeout_min=$(TIME_MIN)) \
	$(if $(SBATCH_EXTRA),'++hydra.launcher.additional_parameters=$(SBATCH_EXTRA)')
# PREFLIGHT=1: every combination to run trains 2 steps in one short job first; nothing is submitted if one fails
PREFLIGHT ?=
PREFLIGHT_TIMEOUT ?=
SWEEP_PREFLIGHT = $(if $(filter 1 yes true,$(PREFLIGHT)),--preflight $(if $(PREFLIGHT_TIMEOUT),--preflight-timeout $(PREFLIGHT_TIMEOUT)))

.PHONY: sweep sweep-local

sweep:  ## submit sweeps/SWEEP.yaml (default grid) to SLURM (skips finished runs, reports progress), e.g. make sweep PARTITION=gpu
	$(PYTHON) -m sweeps.run_sweep $(SWEEP) $(SWEEP_LAUNCHER_OVERRIDES) $(SWEEP_PREFLIGHT) $(ARGS)

sweep-local:  ## the tiny 2x2 grid (SWEEP=tiny) as local processes, no SLURM needed (hydra/launcher=local)
	$(PYTHON) -m sweeps.run_sweep $(if $(filter grid,$(SWEEP)),tiny,$(SWEEP)) --launcher local $(SWEEP_PREFLIGHT) $(ARGS)

# ---------------------------------------------------------------------------------------------- the CPU study
# make study [SEEDS=3] [STUDY_JOBS=2] [STUDY_RUNS=outputs] [ARGS="more overrides"]: sweeps/study_cpu.yaml (every PE x
# attention, toy scale, bytes) as local processes, STUDY_JOBS at a time with one torch thread each; then every RoPE
# checkpoint evaluated again with each STUDY_VARIANTS setting (inference-time context extension, no retraining:
# records in <run>/variants/), one Hydra multirun axis per checkpoint; then the report.
SEEDS ?= 1
STUDY_JOBS ?= 2
STUDY_RUNS ?= outputs
STUDY_VARIANTS ?= +model.pe.scaling.type=linear,ntk,yarn +model.pe.scaling.factor=4
.PHONY: study

study:  ## the CPU study of sweeps/study_cpu.yaml (every PE x attention) into outputs/study_cpu/, then its report (SEEDS=3: seeds 0-2)
	@case "$(SEEDS)" in ''|*[!0-9]*|0) echo "make study: SEEDS must be a positive integer, got '$(SEEDS)'" >&2; exit 2;; esac
	OMP_NUM_THREADS=1 $(PYTHON) -m sweeps.run_sweep study_cpu --launcher local --jobs $(STUDY_JOBS) $(SWEEP_PREFLIGHT) \
		runs_dir=$(STUDY_RUNS) trainer.seed=$$(seq -s, 0 $$(($(SEEDS) - 1))) $(ARGS)
	find $(STUDY_RUNS)/study_cpu -mindepth 1 -maxdepth 1 -name 'rope-*' -type d | sort | xargs -r -P $(STUDY_JOBS) -I{} \
		env OMP_NUM_THREADS=1 $(PYTHON) -m src.eval -m ckpt={} eval=study_cpu device=cpu $(STUDY_VARIANTS)
	$(PYTHON) -m analysis.compare --runs $(STUDY_RUNS)/study_cpu --out $(STUDY_RUNS)/study_cpu/report

# ---------------------------------------------------------------------------------------------- analysis
.PHONY: report

report:  ## tables, figures and report.md comparing runs, e.g. make report ARGS="--runs outputs" (docs/ANALYSIS.md)
	$(PYTHON) -m analysis.compare $(ARGS)
