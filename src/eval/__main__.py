"""Evaluate a trained model: python -m src.eval ckpt=PATH [eval=quick] [eval.hellaswag.limit=100] [device=cpu]

PATH is a run dir (its newest checkpoints/step_*/) or one checkpoint dir inside a run. The val split
comes from the run's own data config, <run_dir>/config.yaml. Results are printed, written to
<ckpt_dir>/eval.json (and eval_details.json: src/eval/details.py) and merged into <run_dir>/summary.json under
the metric names of src/metrics.py (other keys there are kept; eval_details.json is replaced), with
`eval/preset` (the `eval=` choice: budgets differ between presets, so numbers from different presets are not
comparable) and `eval/checkpoint` (which checkpoint was scored).

Inference-time variants: `+model.pe.<key>=<value>` changes the checkpoint's PE config for this evaluation
(RoPE extension without retraining: +model.pe.scaling.type=yarn +model.pe.scaling.factor=4). The results are
then a record of their own, `<run_dir>/variants/<variant>/` (config.yaml, summary.json with `pe_variant`,
eval.json, eval_details.json), and the run's summary is left alone. One sweep axis evaluates all variants of
the same checkpoints:
    python -m src.eval -m ckpt=RUN_A,RUN_B +model.pe.scaling.type=linear,ntk,yarn +model.pe.scaling.factor=4
On CUDA the model runs under bf16 autocast, as in training. Bad input is one line on stderr and exit status 2.
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from src.atomic import atomic_write_json
from src.checkpoint import CheckpointError, load_model, pe_variant
from src.data import DataUnavailableError, ensure_prepared
from src.data.tokenizer import DEFAULT_TOKENIZER
from src.device import autocast_for, resolve_device
from src.errors import ConfigError, exit_bad_input
from src.eval.hellaswag import HellaSwagUnavailableError, ensure_hellaswag
from src.eval.suite import check_eval_config, eval_config, evaluate_suite
from src.metrics import EVAL_CHECKPOINT, EVAL_PRESET, PE_VARIANT
from src.run_record import DETAILS_FILE, RunRecord, variant_record_dir

# What a variant record copies from its run's summary: who the run is, not what it measured.
IDENTITY_KEYS = ("run_name", "pe", "attention", "sweep", "seed", "num_params", "max_steps", "step", "tokens",
                 "config_fingerprint", "git_commit", "torch_version", "device", "world_size")


class RunConfigError(RuntimeError):
    pass


def run_dir_of(ckpt: Path, ckpt_dir: Path) -> Path:
    """The training run a checkpoint belongs to: `ckpt` itself if it is a run dir, else <run>/checkpoints/step_*/."""
    return ckpt if (ckpt / "checkpoints").is_dir() else ckpt_dir.parent.parent


def run_config(run_dir: Path) -> DictConfig:
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise RunConfigError(f"{config_path} not found: the val split is read from the training run's config, "
                             f"so pass ckpt= a run dir or a checkpoint inside one (<run>/checkpoints/step_*)")
    config = OmegaConf.load(config_path)
    if config.get("data") is None:
        raise RunConfigError(f"{config_path} has no data: section")
    return config


def print_table(results: dict) -> None:
    width = max(len(name) for name in results)
    for name, value in results.items():
        shown = "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{name:<{width}}  {shown:>10}")


def write_variant_record(run_dir: Path, variant: str, pe_overrides: dict, config: DictConfig, record: dict,
                         details: dict | None) -> Path:
    """<run_dir>/variants/<variant>/: the run's config with the PE overrides, its identity, these results."""
    variant_record = RunRecord(variant_record_dir(run_dir, variant))
    variant_config = OmegaConf.merge(config, {"model": {"pe": pe_overrides}})
    variant_record.save_config(variant_config)
    identity = {k: v for k, v in RunRecord(run_dir).read_summary().items() if k in IDENTITY_KEYS}
    atomic_write_json(variant_record.summary_path, {**identity, PE_VARIANT: variant, "status": "finished",
                                                    "error": None, **record})
    atomic_write_json(variant_record.run_dir / "eval.json", record)
    if details is not None:
        variant_record.save_details(details)
    return variant_record.run_dir


def evaluate(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise CheckpointError("say which model to evaluate: python -m src.eval ckpt=<run dir or checkpoint dir>")
    eval_cfg = eval_config(cfg.eval)  # bad values fail before the model is loaded
    pe_overrides = OmegaConf.to_container(cfg.model.pe) if cfg.get("model") and cfg.model.get("pe") else {}
    device = resolve_device(cfg.device, local_rank=0, key="device")
    model, ckpt_dir = load_model(cfg.ckpt, device, pe_overrides)
    run_dir = run_dir_of(Path(cfg.ckpt), ckpt_dir)
    config = run_config(run_dir)
    check_eval_config(eval_cfg, config.data.get("tokenizer", DEFAULT_TOKENIZER), model.config.block_size)
    if eval_cfg.hellaswag.enabled:
        ensure_hellaswag(eval_cfg.hellaswag)  # fail in seconds when offline, before any work is done
    shard_dir = ensure_prepared(config.data)
    evaluation = evaluate_suite(model, eval_cfg, shard_dir, device, autocast_for(device, "auto"), details=True)
    variant = pe_variant(model, ckpt_dir, pe_overrides)
    print(f"{ckpt_dir} on {device}" + (f", PE variant {variant}" if variant else "") + ":")
    print_table(evaluation.metrics)
    preset = HydraConfig.get().runtime.choices.get("eval") if HydraConfig.initialized() else None
    record = {**evaluation.metrics, EVAL_PRESET: preset, EVAL_CHECKPOINT: ckpt_dir.name}
    if variant:
        where = write_variant_record(run_dir, variant, pe_overrides, config, record, evaluation.details)
        print(f"wrote the variant record {where}")
        return
    atomic_write_json(ckpt_dir / "eval.json", record)
    RunRecord(run_dir).update_summary(**record)
    written = [ckpt_dir / "eval.json", run_dir / "summary.json"]
    if evaluation.details is not None:
        atomic_write_json(ckpt_dir / DETAILS_FILE, evaluation.details)
        RunRecord(run_dir).save_details(evaluation.details)
        written.append(run_dir / DETAILS_FILE)
    print(f"wrote {', '.join(map(str, written))}")


@hydra.main(version_base=None, config_path="../../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except (ConfigError, CheckpointError, RunConfigError, DataUnavailableError, HellaSwagUnavailableError) as err:
        exit_bad_input(err)


if __name__ == "__main__":
    main()
