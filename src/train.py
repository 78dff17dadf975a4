"""`python -m src.train [overrides]`: train one PE x attention combination (see conf/train.yaml)."""

from __future__ import annotations

import logging
import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import src.schemas  # noqa: F401  (the config schemas and resolvers conf/ relies on)
from src.training.distributed import export_submitit_env
from src.training.trainer import train

log = logging.getLogger(__name__)


@hydra.main(version_base=None, config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir = HydraConfig.get().runtime.output_dir
    export_submitit_env()  # multi-task SLURM job via hydra/launcher=slurm: RANK/WORLD_SIZE/... for DDP
    summary = train(cfg, run_dir)
    log.info("run record: %s  (status %s, val/loss %s)", run_dir, summary.get("status"), summary.get("val/loss"))
    if summary.get("status") == "interrupted":  # checkpointed on a stop signal: exit as that signal would
        log.warning("%s", summary["error"])
        raise SystemExit(128 + signal.Signals[summary["stopped_by"]])
    return summary.get("val/loss")  # Hydra sweepers optimise the returned value


if __name__ == "__main__":
    sys.exit(main())
