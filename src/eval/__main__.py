"""Evaluate a trained model: python -m src.eval ckpt=PATH [eval=quick] [eval.hellaswag.limit=100] [device=cpu]

PATH is a run dir (its newest checkpoints/step_*/) or one checkpoint dir inside a run. The val split
comes from the run's own data config, <run_dir>/config.yaml. Results are printed, written to
<ckpt_dir>/eval.json and merged into <run_dir>/summary.json under the metric names of src/eval/config.py
(other keys there are kept). On CUDA the model runs under bf16 autocast, as in training.
"""

import json
import os
import sys
import tempfile
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from src.checkpoint import CheckpointError, load_model
from src.data import DataUnavailableError, ensure_prepared
from src.eval.hellaswag import HellaSwagUnavailableError, ensure_hellaswag
from src.eval.suite import run_evaluation


class RunConfigError(RuntimeError):
    pass


def run_dir_of(ckpt: Path, ckpt_dir: Path) -> Path:
    """The training run a checkpoint belongs to: `ckpt` itself if it is a run dir, else <run>/checkpoints/step_*/."""
    return ckpt if (ckpt / "checkpoints").is_dir() else ckpt_dir.parent.parent


def run_data_config(run_dir: Path) -> DictConfig:
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise RunConfigError(f"{config_path} not found: the val split is read from the training run's config, "
                             f"so pass ckpt= a run dir or a checkpoint inside one (<run>/checkpoints/step_*)")
    data_cfg = OmegaConf.load(config_path).get("data")
    if data_cfg is None:
        raise RunConfigError(f"{config_path} has no data: section")
    return data_cfg


def write_json(path: Path, obj: dict) -> None:
    """Write atomically (temp file + rename): readers see the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def merge_into_summary(path: Path, results: dict) -> None:
    summary = json.loads(path.read_text()) if path.is_file() else {}
    if not isinstance(summary, dict):
        raise RunConfigError(f"{path} is not a JSON object; not overwriting it")
    write_json(path, {**summary, **results})


def print_table(results: dict) -> None:
    width = max(len(name) for name in results)
    for name, value in results.items():
        shown = "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{name:<{width}}  {shown:>10}")


def evaluate(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise CheckpointError("say which model to evaluate: python -m src.eval ckpt=<run dir or checkpoint dir>")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    model, ckpt_dir = load_model(cfg.ckpt, device)
    run_dir = run_dir_of(Path(cfg.ckpt), ckpt_dir)
    data_cfg = run_data_config(run_dir)
    if cfg.eval.hellaswag.enabled:
        ensure_hellaswag(cfg.eval.hellaswag)  # fail in seconds when offline, before any work is done
    shard_dir = ensure_prepared(data_cfg)
    bf16 = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16) if bf16 else nullcontext
    results = run_evaluation(model, cfg.eval, shard_dir, device, autocast)
    print(f"{ckpt_dir} on {device}:")
    print_table(results)
    write_json(ckpt_dir / "eval.json", results)
    merge_into_summary(run_dir / "summary.json", results)
    print(f"wrote {ckpt_dir / 'eval.json'} and {run_dir / 'summary.json'}")


@hydra.main(version_base=None, config_path="../../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except (CheckpointError, RunConfigError, DataUnavailableError, HellaSwagUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
