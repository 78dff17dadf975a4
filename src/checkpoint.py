"""Checkpoints: safetensors weights + a torch training-state file, written atomically, last N kept.

Layout of one checkpoint directory `<run_dir>/checkpoints/step_<8 digits>/`:
- `model.safetensors`: the model's weights (tied lm_head stored once, as `wte.weight`)
- `model_config.json`: the model config, enough to rebuild the model with `build_model`
- `training_state.pt`: optimizer, data-loader, RNG and step state (loaded with weights_only=True)
The directory is written under a temporary name and renamed into place, so a checkpoint either exists
complete or not at all. A checkpoint is valid only as a whole: weights, config and training state must all
read back (and the weights fit the config); a damaged one (disk full, copied half) is reported and the
previous one used, by resume as by eval, chat and export. A non-finite tensor is never written.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from src.atomic import fsync_dir, fsync_tree
from src.errors import ConfigError
from src.model import PE_REGISTRY, build_model
from src.model.gpt import GPT
from src.structured import dotted_leaves

log = logging.getLogger(__name__)

WEIGHTS, MODEL_CONFIG, TRAINING_STATE = "model.safetensors", "model_config.json", "training_state.pt"


class CheckpointError(RuntimeError):
    pass


class NonFiniteCheckpoint(CheckpointError):
    """The weights or optimizer state hold NaN/inf: such a checkpoint is refused, not written."""


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def _optimizer_tensors(training_state: dict) -> dict[str, torch.Tensor]:
    state = training_state.get("optimizer", {}).get("state", {})
    return {f"optimizer.{i}.{k}": v for i, per_param in state.items() for k, v in per_param.items()
            if isinstance(v, torch.Tensor)}


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state.pop("lm_head.weight", None)  # tied to wte.weight; safetensors refuses shared storage
    return state


def save_checkpoint(ckpt_root: Path, step: int, model: GPT, model_config: dict, training_state: dict,
                    keep_last: int) -> Path:
    weights = model_weights(model)
    bad = _non_finite(weights) + _non_finite(_optimizer_tensors(training_state))
    if bad:
        raise NonFiniteCheckpoint(f"step {step}: non-finite values in {', '.join(bad[:3])}"
                                  + (f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""))
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, str(tmp / WEIGHTS))
    (tmp / MODEL_CONFIG).write_text(json.dumps(model_config, indent=2))
    torch.save(training_state, tmp / TRAINING_STATE)
    fsync_tree(tmp)  # on disk before it gets the name that says "complete" (a power loss must not leave zeros)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(ckpt_root)
    for old in list_checkpoints(ckpt_root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def read_model_config(ckpt_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((ckpt_dir / MODEL_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{ckpt_dir / MODEL_CONFIG} is missing or unreadable ({_first_line(err)})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{ckpt_dir / MODEL_CONFIG} does not hold a model config")
    return config


def load_weights(model: GPT, ckpt_dir: Path) -> None:
    try:
        state = load_file(str(ckpt_dir / WEIGHTS))
    except Exception as err:  # safetensors raises several types for truncated / garbage files
        raise CheckpointError(f"{ckpt_dir / WEIGHTS} is unreadable ({_first_line(err)})") from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise CheckpointError(
            f"{ckpt_dir / WEIGHTS} does not fit the model: missing {missing}, unexpected {unexpected}"
        )


def load_training_state(ckpt_dir: Path) -> dict[str, Any]:
    try:
        return torch.load(ckpt_dir / TRAINING_STATE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message advises weights_only=False, i.e. running whatever code the file holds: not here
        raise CheckpointError(f"{ckpt_dir / TRAINING_STATE} holds objects that a safe load refuses "
                              "(not written by pegrid, or tampered with)") from err
    except Exception as err:
        raise CheckpointError(f"{ckpt_dir / TRAINING_STATE} is unreadable ({_first_line(err)})") from err


def _first_line(err: Exception) -> str:
    text = (err.strerror if isinstance(err, OSError) and err.strerror else str(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


def latest_valid_checkpoint(ckpt_root: Path, model: GPT) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest checkpoint that reads back completely into `model`; warn about damaged ones."""
    for ckpt_dir in reversed(list_checkpoints(ckpt_root)):
        try:
            read_model_config(ckpt_dir)
            state = load_training_state(ckpt_dir)
            load_weights(model, ckpt_dir)
            return ckpt_dir, state
        except CheckpointError as err:
            log.warning("skipping damaged checkpoint: %s; trying the previous one", err)
    return None


def checkpoint_candidates(path: str | Path) -> list[Path]:
    """A checkpoint dir or export folder itself, or a run dir's checkpoints newest first."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return [path]
    candidates = list_checkpoints(path / "checkpoints")[::-1]
    if candidates:
        return candidates
    raise CheckpointError(
        f"no checkpoint at {path}: expected {WEIGHTS} there or a run dir with checkpoints/step_*/ "
        "(train one with `python -m src.train`)"
    )


def find_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint dir, an export folder, or a run dir (its newest checkpoint)."""
    return checkpoint_candidates(path)[0]


def load_model(path: str | Path, device: str | torch.device = "cpu",
               pe_overrides: dict[str, Any] | None = None) -> tuple[GPT, Path]:
    """Rebuild a trained model from a run dir (its newest valid checkpoint), checkpoint dir or export folder.
    `pe_overrides` (nested, e.g. {"scaling": {"type": "yarn", "factor": 4}}) change the saved PE config: an
    inference-time setting, validated against the PE's schema (ConfigError naming the key). Returns (model,
    ckpt_dir)."""

    def load(ckpt_dir: Path) -> tuple[GPT, Path]:
        config = read_model_config(ckpt_dir)
        if pe_overrides:
            config = {**config, "pe": with_pe_overrides(config.get("pe"), pe_overrides)}
        model = build_model(config)
        load_weights(model, ckpt_dir)
        return model.to(device).eval(), ckpt_dir

    *fallbacks, oldest = checkpoint_candidates(path)
    for ckpt_dir in fallbacks:
        try:
            return load(ckpt_dir)
        except CheckpointError as err:
            log.warning("skipping damaged checkpoint: %s; trying the previous one", err)
    return load(oldest)


def pe_variant(model: GPT, ckpt_dir: Path, pe_overrides: dict) -> str | None:
    """The name of the PE variant `model` (loaded from `ckpt_dir` with `pe_overrides`) is: the PE's own
    (`variant_name`, e.g. "yarn×4"), else the overrides that differ from the trained PE ("base=500000"), leaving out
    the keys `variant_name` speaks for; None when nothing differs (a scaling factor of 1, a value equal to the
    trained one or to its schema default)."""
    if not pe_overrides:
        return None
    _, pe = model.attention_layers()[0]
    named = pe.variant_name()
    if named:
        return named
    # the trained PE with its schema's defaults filled in: model.config.pe already holds the overrides
    trained = OmegaConf.structured(PE_REGISTRY.resolve(read_model_config(ckpt_dir).get("pe") or {})[0])
    changed = {k: v for k, v in dotted_leaves(pe_overrides).items()
               if OmegaConf.select(trained, k) != v and k.split(".")[0] not in pe.variant_keys}
    return ",".join(f"{k}={v}" for k, v in changed.items()) or None


def with_pe_overrides(pe_config: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """The saved PE config with `overrides` merged in, checked against the PE's schema (a typo, a wrong type or
    a bad value is a ConfigError naming it, not a damaged checkpoint)."""
    merged = OmegaConf.to_container(OmegaConf.merge(pe_config or {}, overrides))
    try:
        PE_REGISTRY.resolve(merged)
    except ConfigError:
        raise
    except Exception as err:  # OmegaConf's key / type errors, a PE's ValueError
        flat = ", ".join(f"model.pe.{k}={v}" for k, v in dotted_leaves(overrides).items())
        raise ConfigError(f"{flat} does not fit the checkpoint's '{merged.get('name')}' PE: {_first_line(err)}"
                          ) from None
    return merged

