"""FIRE: functional interpolation for relative positions (Li et al. 2023, ICLR 2024), §3, eq. (4).

b(i, j) = f_θ( ψ(i − j) / ψ(max(L, i)) ),  ψ(x) = log(c·x + 1),
with f_θ an MLP (1 → width → ReLU → n_head, one output per head), learnable c (init 0.1) and a learnable
threshold L = |multiplier · L_init| (L_init = 512, multiplier init 1), as in the paper's reference code.
Normalising by the query position makes the inputs lie in [0, 1] at any length, which is how FIRE
extrapolates. One instance per layer.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from src.model.pe.base import PE_REGISTRY, PEConfig, PositionalEncoding


@dataclass
class FIREConfig(PEConfig):
    mlp_width: int = 32
    init_c: float = 0.1
    init_L: float = 512.0
    eps: float = 1e-6


@PE_REGISTRY.register("fire", FIREConfig)
class FIRE(PositionalEncoding):
    has_bias = True
    per_layer = True

    def __init__(self, cfg: FIREConfig, model_cfg) -> None:
        super().__init__(cfg, model_cfg)
        self.mlp = nn.Sequential(nn.Linear(1, cfg.mlp_width), nn.ReLU(), nn.Linear(cfg.mlp_width, model_cfg.n_head))
        self.c = nn.Parameter(torch.tensor(cfg.init_c))
        self.register_buffer("init_L", torch.tensor(cfg.init_L))
        self.L_multiplier = nn.Parameter(torch.tensor(1.0))

    def normalized_distance(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        def psi(x: Tensor) -> Tensor:
            return torch.log(torch.abs(self.c * x) + 1)

        threshold = torch.abs(self.L_multiplier * self.init_L)
        return psi(q_pos - k_pos) / (psi(torch.maximum(q_pos, threshold)) + self.cfg.eps)

    def bias(self, h: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        # Elementwise form for FlexAttention's score_mod: evaluates the MLP for head h only.
        first, second = self.mlp[0], self.mlp[2]
        hidden = torch.relu(self.normalized_distance(q_pos, k_pos)[..., None] * first.weight[:, 0] + first.bias)
        return (hidden * second.weight[h]).sum(-1) + second.bias[h]

    def bias_matrix(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        # Dense form: one MLP pass gives all heads, [..., Tq, Tk, H] -> [H, ..., Tq, Tk].
        x = self.normalized_distance(q_pos.float()[..., :, None], k_pos.float()[..., None, :])
        return self.mlp(x[..., None]).movedim(-1, 0)
