"""KERPLE: kernelized relative positional embedding (Chi et al. 2022, NeurIPS), §4, eqs. (7)–(8).

Conditionally positive definite kernels turned into score biases, with learnable r1, r2 > 0 per head:
- log   (default, the paper's best):  b(i, j) = −r1 · log(1 + r2 · |i − j|)
- power:                              b(i, j) = −r1 · |i − j|^r2,  0 < r2 ≤ 2
Initialisation and positivity as the authors' code: r1 ~ U(0, 2)·(log) / r1 ~ U(0, 1) (power), the other
U(0, 1) resp. U(0, 2), clamped to ≥ eps (and r2 ≤ 2 for power) in the forward pass. One instance per layer.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from src.errors import ConfigError
from src.model.pe.base import PE_REGISTRY, PEConfig, PositionalEncoding


@dataclass
class KERPLEConfig(PEConfig):
    variant: str = "log"  # log (the paper's best) | power
    eps: float = 1e-2  # lower clamp keeping r1, r2 positive

    def __post_init__(self) -> None:
        if not self.eps > 0:  # the floor that keeps r1, r2 positive
            raise ConfigError(f"model.pe.eps must be positive, got {self.eps}")


@PE_REGISTRY.register("kerple", KERPLEConfig)
class KERPLE(PositionalEncoding):
    has_bias = True
    per_layer = True

    def __init__(self, cfg: KERPLEConfig, model_cfg) -> None:
        super().__init__(cfg, model_cfg)
        if cfg.variant not in ("log", "power"):
            raise ValueError(f"model.pe.variant must be 'log' or 'power', got '{cfg.variant}'")
        scale_r1, scale_r2 = (2.0, 1.0) if cfg.variant == "log" else (1.0, 2.0)
        self.r1 = nn.Parameter(torch.rand(model_cfg.n_head) * scale_r1)
        self.r2 = nn.Parameter(torch.rand(model_cfg.n_head) * scale_r2)

    def bias(self, h: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        r1 = self.r1.clamp(min=self.cfg.eps)[h]
        distance = (q_pos - k_pos).abs()
        if self.cfg.variant == "log":
            return -r1 * torch.log1p(self.r2.clamp(min=self.cfg.eps)[h] * distance)
        return -r1 * distance.pow(self.r2.clamp(min=self.cfg.eps, max=2.0)[h])
