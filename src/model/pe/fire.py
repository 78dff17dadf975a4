"""FIRE: functional interpolation for relative positions (Li et al. 2023, ICLR 2024), §3, eq. (4).

b(i, j) = f_θ( ψ(i − j) / ψ(max(L, i)) ),  ψ(x) = log(c·x + 1),
with f_θ an MLP (1 → width → ReLU → n_head, one output per head), learnable c (init 0.1) and a learnable
threshold L = |multiplier · L_init| (L_init = 512, multiplier init 1), as in the paper's reference code.
Normalising by the query position makes the inputs lie in [0, 1] at any length, which is how FIRE
extrapolates. One instance per layer.

Evaluation: a ReLU MLP of one scalar is piecewise linear, with a kink where each hidden unit switches on
(x = −b₁ₖ/w₁ₖ). So f_θ is rebuilt every forward pass as `width + 1` segments (slope and intercept per head,
differentiable in the MLP's weights) and each (i, j) pair costs a binary search and two table lookups,
instead of a [T, T, width] hidden tensor forward and backward. Same values and gradients as running the MLP
(tested), ~4× less memory kept for the backward pass.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from src.errors import ConfigError
from src.model.pe.base import PE_REGISTRY, PEConfig, PositionalEncoding


@dataclass
class FIREConfig(PEConfig):
    mlp_width: int = 32
    init_c: float = 0.1
    init_L: float = 512.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        for key in ("mlp_width", "init_c", "init_L", "eps"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"model.pe.{key} must be positive, got {getattr(self, key)}")


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

    def mlp_segments(self) -> tuple[Tensor, Tensor, Tensor]:
        """f_θ as linear pieces: sorted kinks [width] and per-segment slope, intercept [width + 1, H].
        Segment s covers (kink[s−1], kink[s]]; a unit with w₁ = 0 is constant and gets no kink (+inf)."""
        first, second = self.mlp[0], self.mlp[2]
        w1, b1 = first.weight[:, 0], first.bias
        kinks = torch.where(w1 != 0, -b1 / w1, torch.inf).detach()
        kinks, order = kinks.sort()
        w1, b1, w2 = w1[order], b1[order], second.weight[:, order]
        segment = torch.arange(len(kinks) + 1, device=w1.device)[:, None]
        unit = torch.arange(len(kinks), device=w1.device)[None, :]
        # Unit r (r-th kink) is on above its kink when w₁ > 0, below it when w₁ < 0, always when b₁ > 0 (w₁ = 0).
        on = torch.where(w1 > 0, segment > unit, torch.where(w1 < 0, segment <= unit, b1 > 0)).to(w1.dtype)
        return kinks, on @ (w2 * w1).T, on @ (w2 * b1).T + second.bias

    def bias_matrix(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        x = self.normalized_distance(q_pos.float()[..., :, None], k_pos.float()[..., None, :])
        kinks, slope, intercept = self.mlp_segments()
        segment = torch.bucketize(x.detach(), kinks)
        # Indexing, not F.embedding: its backward (index_put_ accumulate) is ~6× faster on CPU here.
        return (slope[segment] * x[..., None] + intercept[segment]).movedim(-1, 0)

    def score_mod_bias(self, q_pos: Tensor, k_pos: Tensor):
        # A per-score MLP in FlexAttention's kernel cannot be lowered (its sum over hidden units is a
        # reduction) and would put atomics into the MLP's weights in the backward. The bias does not depend
        # on the batch, so one [H, Tq, Tk] table per layer, looked up in the kernel, is B× smaller than the
        # scores it biases.
        table = self.bias_matrix(q_pos, k_pos)
        return lambda h, q_idx, kv_idx: table[h, q_idx, kv_idx]
