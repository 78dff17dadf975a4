"""`python -m src.train [overrides]`: train one PE x attention combination (see conf/train.yaml).

Bad input is one line on stderr and exit status 2 (src/errors.py); src/preflight.py checks it before Hydra
creates the run dir.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import src.schemas  # noqa: F401  (the config schemas and resolvers conf/ relies on)
from src.completion import print_hook
from src.errors import exit_bad_input
from src.metrics import VAL_LOSS
from src.preflight import BAD_INPUT
from src.training.distributed import export_submitit_env
from src.training.run_lock import LOCK_FILE, RunDirLocked, RunLock
from src.training.trainer import TrainingDiverged, train

log = logging.getLogger(__name__)


@hydra.main(version_base=None, config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir = HydraConfig.get().runtime.output_dir
    export_submitit_env()  # multi-task SLURM job via hydra/launcher=slurm: RANK/WORLD_SIZE/... for DDP
    try:
        summary = train(cfg, run_dir)
    except (*BAD_INPUT, RunDirLocked) as error:  # found with the run dir made: a sweep job's values, the network
        remove_unused_run_dir(Path(run_dir), f"{HydraConfig.get().job.name}.log")
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweep reports the failed job and runs the others
        exit_bad_input(error)
    except TrainingDiverged as error:  # not a bug: the record says so, the user changes lr / warmup
        if HydraConfig.get().mode == RunMode.MULTIRUN or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    log.info("run record: %s  (status %s, %s %s)", run_dir, summary.get("status"), VAL_LOSS, summary.get(VAL_LOSS))
    if summary.get("status") == "interrupted":  # checkpointed on a stop signal: exit as that signal would
        log.warning("%s", summary["error"])
        raise SystemExit(128 + signal.Signals[summary["stopped_by"]])
    return summary.get(VAL_LOSS)  # Hydra sweepers optimise the returned value


def remove_unused_run_dir(run_dir: Path, hydra_log: str) -> None:
    """Remove run_dir if it holds only what Hydra (.hydra/, its log) and the run lock put there, i.e. no run
    record; never while another process holds its lock (the same run started twice)."""
    if not set(os.listdir(run_dir)) <= {".hydra", hydra_log, LOCK_FILE}:
        return
    try:
        with RunLock(run_dir):
            shutil.rmtree(run_dir)
    except RunDirLocked:
        pass


if __name__ == "__main__":
    if not print_hook(sys.argv[1:]):  # `-sc install=bash`: our hook, Hydra's misses `python -m` (src/completion.py)
        sys.exit(main())
