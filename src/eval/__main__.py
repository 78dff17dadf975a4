"""Evaluate a trained model: python -m src.eval ckpt=PATH [eval=quick] [eval.hellaswag.limit=100] [device=cpu]

PATH is a run dir (its newest checkpoints/step_*/) or one checkpoint dir inside a run. The val split
comes from the run's own data config, <run_dir>/config.yaml. Results are printed, written to
<ckpt_dir>/eval.json and merged into <run_dir>/summary.json under the metric names of src/eval/config.py
(other keys there are kept), with `eval/preset` (the `eval=` choice: budgets differ between presets, so
numbers from different presets are not comparable) and `eval/checkpoint` (which checkpoint was scored).
On CUDA the model runs under bf16 autocast, as in training. Bad input is one line on stderr and exit status 2.
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from src.atomic import atomic_write_json
from src.checkpoint import CheckpointError, load_model
from src.data import DataUnavailableError, ensure_prepared
from src.device import autocast_for, resolve_device
from src.errors import ConfigError, exit_bad_input
from src.eval.hellaswag import HellaSwagUnavailableError, ensure_hellaswag
from src.eval.suite import eval_config, run_evaluation
from src.run_record import RunRecord


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


def print_table(results: dict) -> None:
    width = max(len(name) for name in results)
    for name, value in results.items():
        shown = "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{name:<{width}}  {shown:>10}")


def evaluate(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise CheckpointError("say which model to evaluate: python -m src.eval ckpt=<run dir or checkpoint dir>")
    eval_cfg = eval_config(cfg.eval)  # bad values fail before the model is loaded
    device = resolve_device(cfg.device, local_rank=0, key="device")
    model, ckpt_dir = load_model(cfg.ckpt, device)
    run_dir = run_dir_of(Path(cfg.ckpt), ckpt_dir)
    data_cfg = run_data_config(run_dir)
    if eval_cfg.hellaswag.enabled:
        ensure_hellaswag(eval_cfg.hellaswag)  # fail in seconds when offline, before any work is done
    shard_dir = ensure_prepared(data_cfg)
    results = run_evaluation(model, eval_cfg, shard_dir, device, autocast_for(device, "auto"))
    print(f"{ckpt_dir} on {device}:")
    print_table(results)
    preset = HydraConfig.get().runtime.choices.get("eval") if HydraConfig.initialized() else None
    record = {**results, "eval/preset": preset, "eval/checkpoint": ckpt_dir.name}
    atomic_write_json(ckpt_dir / "eval.json", record)
    RunRecord(run_dir).update_summary(**record)
    print(f"wrote {ckpt_dir / 'eval.json'} and {run_dir / 'summary.json'}")


@hydra.main(version_base=None, config_path="../../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except (ConfigError, CheckpointError, RunConfigError, DataUnavailableError, HellaSwagUnavailableError) as err:
        exit_bad_input(err)


if __name__ == "__main__":
    main()
