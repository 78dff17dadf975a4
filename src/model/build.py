"""`build_model(cfg)`: the public constructor used by training, evaluation, chat and outside checks."""

from __future__ import annotations

from typing import Any

from src.model.config import ModelConfig
from src.model.gpt import GPT
from src.structured import to_dataclass


def model_config(cfg: Any) -> ModelConfig:
    """Validate a model config (ModelConfig, DictConfig or dict) into a typed ModelConfig."""
    return to_dataclass(ModelConfig, cfg)


def build_model(cfg: Any) -> GPT:
    """Build the GPT for `cfg` (the `model` node of the Hydra config, a dict or a ModelConfig)."""
    return GPT(model_config(cfg))
