"""The run record every run leaves in its run dir; analysis and outside tools read it.

- `config.yaml`: the resolved config
- `metrics.jsonl`: one JSON object per logged step (training rows and evaluation rows, each with `step`)
- `summary.json`: final figures and `status` (running / finished / failed), rewritten atomically
- `eval_details.json`: what the final evaluation measured beyond single numbers (loss by token position, the
  PE's bias by distance, attention entropy and distance per layer; src/eval/details.py)
- `variants/<variant>/`: a record of the same checkpoint evaluated with an inference-time PE setting
  (`python -m src.eval ... model.pe.scaling.type=yarn`): config.yaml, summary.json, eval_details.json
- `checkpoints/step_XXXXXXXX/`: see src/checkpoint.py
The format is documented in README.md ("Run record"). A record that must not be mixed with a new run (a
`trainer.resume=never` restart, a stale sweep run) is moved aside to `<parent>/.superseded/`, never deleted;
readers skip hidden directories.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.atomic import atomic_write, atomic_write_json, json_safe

SUPERSEDED_DIR = ".superseded"
# what belongs to one run's record (Hydra's .hydra/ and the log are rewritten by every launch)
DETAILS_FILE = "eval_details.json"
VARIANTS_DIR = "variants"
RECORD_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "eval.json", DETAILS_FILE, VARIANTS_DIR, "checkpoints",
                "wandb_run_id.txt", "wandb")


def variant_record_dir(run_dir: Path, variant: str) -> Path:
    """Where the record of `run_dir`'s checkpoint evaluated as PE variant `variant` lives: "yarn×4" ->
    <run_dir>/variants/yarn-x4/."""
    return run_dir / VARIANTS_DIR / re.sub(r"[^A-Za-z0-9._=-]+", "_", variant.replace("×", "-x"))


class RunRecord:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.summary_path = run_dir / "summary.json"
        self.checkpoint_dir = run_dir / "checkpoints"

    def save_config(self, cfg: DictConfig) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, self.run_dir / "config.yaml", resolve=True)

    def read_summary(self) -> dict:
        try:
            return json.loads(self.summary_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def update_summary(self, **fields: Any) -> dict:
        summary = self.read_summary() | fields
        atomic_write_json(self.summary_path, summary)
        return summary

    def save_details(self, details: dict) -> None:
        atomic_write_json(self.run_dir / DETAILS_FILE, details)

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short when a run was killed mid-write
        return rows

    def log(self, row: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({k: json_safe(v) for k, v in row.items()}) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint: the resumed run logs those steps again."""
        if not self.metrics_path.exists():
            return
        kept = [row for row in self.read_metrics() if row["step"] <= step]
        atomic_write(self.metrics_path, "".join(json.dumps(row) + "\n" for row in kept).encode())

    def has_record(self) -> bool:
        return any((self.run_dir / name).exists() for name in RECORD_FILES)

    def move_aside(self) -> Path:
        """Move this run's record files to `<parent>/.superseded/<run name>-<time>/`; return that dir."""
        target = self.run_dir.parent / SUPERSEDED_DIR / f"{self.run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        suffix = 0
        while target.exists():
            suffix += 1
            target = target.with_name(f"{target.name.rsplit('~', 1)[0]}~{suffix}")
        target.mkdir(parents=True)
        for name in RECORD_FILES:
            if (self.run_dir / name).exists():
                os.replace(self.run_dir / name, target / name)
        return target
