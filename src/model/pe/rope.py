"""Rotary position embedding (Su et al. 2021, "RoFormer", §3.4, eq. 34).

Each pair (x_2i, x_2i+1) of a query/key head vector at position m is rotated by the angle m·θ_i with
θ_i = base^(-2i/d), base = 10000. Then <R_m q, R_n k> depends on m and n only through m − n (eq. 16).
The cos/sin table grows on demand (doubling), so sequences longer than `block_size` just work.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from src.errors import ConfigError
from src.model.pe.base import PE_REGISTRY, PEConfig, PositionalEncoding


@dataclass
class RoPEConfig(PEConfig):
    base: float = 10000.0  # RoFormer's θ base

    def __post_init__(self) -> None:
        if not self.base > 1:  # θ_i = base^(-2i/d) must fall with i
            raise ConfigError(f"model.pe.base must be > 1, got {self.base}")


@PE_REGISTRY.register("rope", RoPEConfig)
class RoPE(PositionalEncoding):
    def __init__(self, cfg: RoPEConfig, model_cfg) -> None:
        super().__init__(cfg, model_cfg)
        head_dim = model_cfg.n_embd // model_cfg.n_head
        if head_dim % 2:
            raise ValueError(f"rope needs an even head dimension (n_embd / n_head), got {head_dim}")
        theta = cfg.base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("theta", theta, persistent=False)
        self._grow(model_cfg.block_size)

    def _grow(self, length: int) -> None:
        angles = torch.arange(length, dtype=torch.float64, device=self.theta.device)[:, None] * self.theta
        self.register_buffer("cos", angles.cos().float(), persistent=False)  # [L, D/2]
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def prepare(self, seq_end: int) -> None:
        if seq_end > self.cos.shape[0]:
            self._grow(max(seq_end, 2 * self.cos.shape[0]))

    def rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        cos, sin = self.cos[pos].to(x.dtype), self.sin[pos].to(x.dtype)  # [T, D/2]
        x_even, x_odd = x.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = (x_even * cos - x_odd * sin, x_even * sin + x_odd * cos)
        return torch.stack(rotated, dim=-1).flatten(-2)
