"""Compose real training configs with Hydra's compose API for tests."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import src.schemas  # noqa: F401
from src.data import TokenLoader
from tests.conftest import ROOT


def tiny_overrides(data_dir, steps: int = 2, extra: list[str] = ()) -> list[str]:
    """A tiny model for `steps` steps on the embedded corpus, with a quick evaluation."""
    return [
        "model=tiny",
        f"data.cache_dir={data_dir}",
        f"trainer.max_steps={steps}",
        "trainer.total_batch_tokens=128",
        "trainer.micro_batch_size=4",
        "trainer.warmup_steps=1",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        f"trainer.ckpt_every={steps}",
        "trainer.progress=false",
        "eval=offline",
        "eval.val.num_tokens=512",
        "eval.extrapolation.multipliers=[1,2]",
        "eval.extrapolation.num_tokens=512",
        *extra,
    ]


def compose_train(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="train", overrides=overrides)


def record_rows(run_dir) -> list[dict]:
    """Every row of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in record_rows(run_dir) if "train/loss" in r}


def next_batch_that_signals(at_batch: int, signum: int) -> Callable:
    """A TokenLoader.next_batch that sends `signum` to this process while fetching batch number `at_batch`:
    the step in progress finishes, then a stop signal takes effect."""
    original, batches = TokenLoader.next_batch, {"n": 0}

    def next_batch(self):
        batches["n"] += 1
        if batches["n"] == at_batch:
            os.kill(os.getpid(), signum)
        return original(self)

    return next_batch
