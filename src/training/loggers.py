"""Experiment trackers. metrics.jsonl is always written (run_record.py); W&B mirrors it when enabled."""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from src.metrics import WANDB_STEP
from src.training.config import LoggerConfig

log = logging.getLogger(__name__)

GOLDEN_FRACTION = 0.6180339887498949  # 1/phi: n * it mod 1 spreads consecutive n evenly over [0, 1)
INIT_BACKOFF_S = 15.0  # wandb.init retry k (0-based) waits INIT_BACKOFF_S * 2**k


def init_delay(stagger_s: float, run_name: str, env: Mapping[str, str] = os.environ) -> float:
    """The seconds this job waits before wandb.init: deterministic per job, in [0, stagger_s).

    A sweep's SLURM job array starts many jobs in the same second, and W&B rate-limits the run creations that
    follow (wandb issues #8023, #5445: 429s, init timeouts). The array task id picks the delay, so that
    consecutive tasks land far apart (a golden-ratio sequence, not a hash that could put neighbours together);
    outside an array (local launcher, a single sbatch) a hash of the run name does. Not SLURM_PROCID: only rank 0
    calls wandb.init, and it is 0 in every job. A requeued job waits as long as it did the first time."""
    if stagger_s <= 0:
        return 0.0
    task = str(env.get("SLURM_ARRAY_TASK_ID", ""))
    n = int(task) if task.isdigit() else int.from_bytes(hashlib.sha256(run_name.encode()).digest()[:4], "big")
    return stagger_s * ((n * GOLDEN_FRACTION) % 1.0)


class NoLogger:
    run_id: str | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def final_report(self, run_dir: Path) -> None:
        """The figures and the final evaluation table of a finished run (W&B only)."""

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger(NoLogger):
    """One W&B run per training run; its id is kept in the run dir so a resumed run continues the same one."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, name: str, config: dict, tags: list[str]):
        import wandb

        id_file = run_dir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self._wandb = wandb
        init = dict(project=cfg.project, entity=cfg.entity, group=cfg.group, name=name, tags=tags, config=config,
                    id=run_id, resume="allow", mode=cfg.mode, dir=str(run_dir))
        self.run = self._init(cfg, init) if cfg.mode == "online" else wandb.init(**init)
        self.run_id = run_id
        self.run.define_metric(WANDB_STEP)
        self.run.define_metric("*", step_metric=WANDB_STEP)

    def _init(self, cfg: LoggerConfig, init: dict):
        """wandb.init of an online run: after its stagger delay, and again after a communication error (a rate
        limit, a timeout) up to cfg.init_retries times with a doubling wait; bad credentials are not retried."""
        delay = init_delay(cfg.init_stagger_s, init["name"])
        if delay:
            log.info("logger.init_stagger_s=%g: waiting %.1f s before wandb.init", cfg.init_stagger_s, delay)
            time.sleep(delay)
        errors, attempt = self._wandb.errors, 0
        while True:
            try:
                return self._wandb.init(**init)
            except errors.CommError as err:
                if isinstance(err, errors.AuthenticationError) or attempt >= cfg.init_retries:
                    raise
                wait = INIT_BACKOFF_S * 2**attempt
                attempt += 1
                reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
                log.warning("wandb.init failed (%s: %s); retry %d of %d in %.0f s", type(err).__name__, reason,
                            attempt, cfg.init_retries, wait)
                time.sleep(wait)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({WANDB_STEP: step, **{k: v for k, v in metrics.items() if v is not None}})

    def summary(self, metrics: dict[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in metrics.items() if v is not None})

    def final_report(self, run_dir: Path) -> None:
        if self.run.disabled:  # mode=disabled: nothing would keep the figures, so do not draw them
            return
        from src.training.wandb_report import log_final_report

        log_final_report(self.run, run_dir)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def build_logger(cfg: LoggerConfig, run_dir: Path, name: str, config: dict, tags: list[str]) -> NoLogger:
    if cfg.name == "wandb":
        return WandbLogger(cfg, run_dir, name, config, tags)
    return NoLogger()
