"""`build_model(cfg)`: the public constructor used by training, evaluation, chat and outside checks."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.model.config import ModelConfig
from src.model.gpt import GPT


def model_config(cfg: Any) -> ModelConfig:
    """Validate a model config (ModelConfig, DictConfig or dict) into a typed ModelConfig."""
    if isinstance(cfg, ModelConfig):
        return cfg
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg)
    return OmegaConf.to_object(merged)


def build_model(cfg: Any) -> GPT:
    """Build the GPT for `cfg` (the `model` node of the Hydra config, a dict or a ModelConfig)."""
    return GPT(model_config(cfg))
