"""Checkpoints: safetensors weights + a torch training-state file, written atomically, last N kept.

Layout of one checkpoint directory `<run_dir>/checkpoints/step_<8 digits>/`:
- `model.safetensors`: the model's weights (tied lm_head stored once, as `wte.weight`)
- `model_config.json`: the model config, enough to rebuild the model with `build_model`
- `training_state.pt`: optimizer, data-loader, RNG and step state (loaded with weights_only=True)
The directory is written under a temporary name and renamed into place, so a checkpoint either exists
complete or not at all; a damaged one (disk full, copied half) is reported and the previous one used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from src.model import build_model
from src.model.gpt import GPT

log = logging.getLogger(__name__)

WEIGHTS, MODEL_CONFIG, TRAINING_STATE = "model.safetensors", "model_config.json", "training_state.pt"


class CheckpointError(RuntimeError):
    pass


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state.pop("lm_head.weight", None)  # tied to wte.weight; safetensors refuses shared storage
    return state


def save_checkpoint(ckpt_root: Path, step: int, model: GPT, model_config: dict, training_state: dict,
                    keep_last: int) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(model_weights(model), str(tmp / WEIGHTS))
    (tmp / MODEL_CONFIG).write_text(json.dumps(model_config, indent=2))
    torch.save(training_state, tmp / TRAINING_STATE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def load_weights(model: GPT, ckpt_dir: Path) -> None:
    try:
        state = load_file(str(ckpt_dir / WEIGHTS))
    except Exception as err:  # safetensors raises several types for truncated / garbage files
        raise CheckpointError(f"{ckpt_dir / WEIGHTS} is unreadable ({err})") from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise CheckpointError(
            f"{ckpt_dir / WEIGHTS} does not fit the model: missing {missing}, unexpected {unexpected}"
        )


def load_training_state(ckpt_dir: Path) -> dict[str, Any]:
    try:
        return torch.load(ckpt_dir / TRAINING_STATE, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{ckpt_dir / TRAINING_STATE} is unreadable ({err})") from err


def latest_valid_checkpoint(ckpt_root: Path, model: GPT) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest checkpoint that reads back completely into `model`; warn about damaged ones."""
    for ckpt_dir in reversed(list_checkpoints(ckpt_root)):
        try:
            state = load_training_state(ckpt_dir)
            load_weights(model, ckpt_dir)
            return ckpt_dir, state
        except CheckpointError as err:
            log.warning("skipping damaged checkpoint: %s; trying the previous one", err)
    return None


def find_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint dir, an export folder, or a run dir (its newest checkpoint)."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    candidates = list_checkpoints(path / "checkpoints")
    if candidates:
        return candidates[-1]
    raise CheckpointError(
        f"no checkpoint at {path}: expected {WEIGHTS} there or a run dir with checkpoints/step_*/ "
        "(train one with `python -m src.train`)"
    )


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Path]:
    """Rebuild a trained model from a run dir, checkpoint dir or export folder. Returns (model, ckpt_dir)."""
    ckpt_dir = find_checkpoint_dir(path)
    try:
        model_config = json.loads((ckpt_dir / MODEL_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{ckpt_dir / MODEL_CONFIG} is missing or unreadable ({err})") from err
    model = build_model(model_config)
    load_weights(model, ckpt_dir)
    return model.to(device).eval(), ckpt_dir
