"""Experiment trackers. metrics.jsonl is always written (run_record.py); W&B mirrors it when enabled."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from src.metrics import WANDB_STEP
from src.training.config import LoggerConfig


class NoLogger:
    run_id: str | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

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
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group, name=name, tags=tags, config=config,
            id=run_id, resume="allow", mode=cfg.mode, dir=str(run_dir),
        )
        self.run_id = run_id
        self.run.define_metric(WANDB_STEP)
        self.run.define_metric("*", step_metric=WANDB_STEP)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({WANDB_STEP: step, **{k: v for k, v in metrics.items() if v is not None}})

    def summary(self, metrics: dict[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in metrics.items() if v is not None})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def build_logger(cfg: LoggerConfig, run_dir: Path, name: str, config: dict, tags: list[str]) -> NoLogger:
    if cfg.name == "wandb":
        return WandbLogger(cfg, run_dir, name, config, tags)
    return NoLogger()
