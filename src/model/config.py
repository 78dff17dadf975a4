"""The model's structured config schema (Hydra group `model`), stored as `model_schema`; its defaults are
GPT-2 124M's (conf/model/gpt2.yaml adds only the vocabulary that follows data.tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from src.structured import store_schema


@dataclass
class ModelConfig:
    # GPT-2 124M (Radford et al. 2019)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # training context; PEs that extrapolate accept longer sequences
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 128 for fast matmuls
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    # Validated against the schema of the chosen PE / attention (see registry.py).
    pe: Any = field(default_factory=lambda: {"name": "learned"})
    attention: Any = field(default_factory=lambda: {"name": "flash"})

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


store_schema("model", ModelConfig)
