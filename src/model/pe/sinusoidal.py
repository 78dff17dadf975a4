"""Fixed sinusoidal position encodings (Vaswani et al. 2017, "Attention Is All You Need", §3.5).

PE(pos, 2i) = sin(pos / base^(2i/d)),  PE(pos, 2i+1) = cos(pos / base^(2i/d)), base = 10000,
added to the token embeddings, which are first multiplied by √d_model (§3.4) so that tokens are not drowned
by the unit-amplitude waves (GPT-2's embeddings start at std 0.02). Computed from the positions on every
call, so any length works.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from src.errors import ConfigError
from src.model.pe.base import PE_REGISTRY, PEConfig, PositionalEncoding


@dataclass
class SinusoidalConfig(PEConfig):
    base: float = 10000.0  # Vaswani et al.
    scale_embeddings: bool = True  # multiply token embeddings by √d_model, as the paper (§3.4)

    def __post_init__(self) -> None:
        if not self.base > 1:  # the wavelengths 2π·base^(2i/d) must grow with i
            raise ConfigError(f"model.pe.base must be > 1, got {self.base}")


@PE_REGISTRY.register("sinusoidal", SinusoidalConfig)
class SinusoidalPE(PositionalEncoding):
    def __init__(self, cfg: SinusoidalConfig, model_cfg) -> None:
        super().__init__(cfg, model_cfg)
        if model_cfg.n_embd % 2:
            raise ValueError(f"sinusoidal PE needs an even model.n_embd, got {model_cfg.n_embd}")
        inv_freq = cfg.base ** (-torch.arange(0, model_cfg.n_embd, 2, dtype=torch.float64) / model_cfg.n_embd)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.embedding_scale = math.sqrt(model_cfg.n_embd) if cfg.scale_embeddings else 1.0

    def table(self, pos: Tensor) -> Tensor:
        angles = pos.float()[:, None] * self.inv_freq[None, :]  # [T, C/2]
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)  # interleave: sin at 2i, cos at 2i+1

    def embed(self, x: Tensor, pos: Tensor) -> Tensor:
        return x * self.embedding_scale + self.table(pos).to(x.dtype)
