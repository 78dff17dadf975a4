"""Rotary position embedding (Su et al. 2021, "RoFormer", §3.4, eq. 34), with context extension at inference time.

Each pair (x_2i, x_2i+1) of a query/key head vector at position m is rotated by the angle m·θ_i with
θ_i = base^(-2i/d), base = 10000. Then <R_m q, R_n k> depends on m and n only through m − n (eq. 16).
The cos/sin table grows on demand (doubling), so sequences longer than `block_size` just work.

`scaling` stretches a model trained on L tokens (`original_context`, default block_size) to s·L (s = `factor`)
with no retraining. Equation numbers are those of YaRN (Peng, Quesnelle, Fan, Shippole 2023, arXiv 2309.00071,
as in the authors' PDF, github.com/jquesnelle/yarn paper/yarn.pdf), which writes every method as RoPE at a
changed position g(m) with changed frequencies h(θ_d) (eq. 12):
- `linear`, Position Interpolation (Chen et al. 2023, arXiv 2306.15595; YaRN eq. 10 and §2.3):
  g(m) = m / s, h(θ_d) = θ_d.
- `ntk`, "NTK-aware" (bloc97 2023; YaRN §3.1, eqs. 14-16, derived in appendix A.1, eqs. 23-24):
  g(m) = m, base b' = b · s^(|D| / (|D| − 2)), so the lowest frequency is divided by s and the highest kept.
- `yarn`: "NTK-by-parts" (YaRN §3.2, eqs. 17-20) plus attention temperature (§3.4, eqs. 21-22). With the
  wavelength λ_d = 2π / θ_d (eq. 13) and r(d) = L / λ_d (eq. 17), the ramp γ(r) = 0 if r < α, 1 if r > β,
  (r − α) / (β − α) otherwise (eq. 18) gives h(θ_d) = (1 − γ(r(d))) θ_d / s + γ(r(d)) θ_d (eq. 20), g(m) = m
  (eq. 19), α = `beta_slow`, β = `beta_fast`. The logits are divided by t (eq. 21) by scaling cos and sin, hence
  q and k, by √(1/t) = 0.1 ln(s) + 1 (eq. 22; Hugging Face's `attention_factor`).
  Eq. 17 prints b' where eq. 13 has b; r is computed, as in the authors' code, from the unscaled θ_d. Hugging
  Face's ramp (`_compute_yarn_parameters`) is linear in the dimension index between whole-dimension bounds,
  i.e. linear in log r: the bands r < α and r > β agree up to that rounding, the values in between differ.
A factor of exactly 1 is plain RoPE, whatever the type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from src.errors import ConfigError
from src.model.pe.base import PE_REGISTRY, PEConfig, PositionalEncoding

SCALING_TYPES = ("none", "linear", "ntk", "yarn")


@dataclass
class RoPEScalingConfig:
    type: str = "none"  # one of SCALING_TYPES
    factor: float = 1.0  # s = L' / L, the context extension (YaRN eq. 11)
    original_context: int | None = None  # L, the context trained on; None: the model's block_size
    beta_fast: float = 32.0  # yarn: β, above which r = L / λ_d keeps θ_d (YaRN's value for Llama)
    beta_slow: float = 1.0  # yarn: α, below which θ_d is interpolated to θ_d / s

    def __post_init__(self) -> None:
        if self.type not in SCALING_TYPES:
            raise ConfigError(f"model.pe.scaling.type must be one of {', '.join(SCALING_TYPES)}, got '{self.type}'")
        if not self.factor >= 1:  # s < 1 would shrink the context
            raise ConfigError(f"model.pe.scaling.factor must be >= 1 (the context extension s), got {self.factor}")
        if self.original_context is not None and self.original_context <= 0:
            raise ConfigError(f"model.pe.scaling.original_context must be positive (or null: the model's "
                              f"block_size), got {self.original_context}")
        if not self.beta_fast > self.beta_slow > 0:  # the ramp (YaRN eq. 18) needs β > α > 0
            raise ConfigError(f"model.pe.scaling needs beta_fast > beta_slow > 0, got beta_fast={self.beta_fast}, "
                              f"beta_slow={self.beta_slow}")

    @property
    def is_plain(self) -> bool:
        return self.type == "none" or self.factor == 1


@dataclass
class RoPEConfig(PEConfig):
    base: float = 10000.0  # RoFormer's θ base
    scaling: RoPEScalingConfig = field(default_factory=RoPEScalingConfig)  # inference-time context extension

    def __post_init__(self) -> None:
        if not self.base > 1:  # θ_i = base^(-2i/d) must fall with i
            raise ConfigError(f"model.pe.base must be > 1, got {self.base}")


def rope_theta(base: float, head_dim: int) -> Tensor:
    """θ_i = base^(-2i/d), i = 0 .. d/2 − 1 (RoFormer eq. 15), in float64."""
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def ntk_base(base: float, factor: float, head_dim: int) -> float:
    """b' = b · s^(|D| / (|D| − 2)) (YaRN eq. 16): the lowest frequency b'^(-(|D|-2)/|D|) is the old one / s."""
    return base * factor ** (head_dim / (head_dim - 2))


def yarn_ramp(r: Tensor, alpha: float, beta: float) -> Tensor:
    """γ(r) (YaRN eq. 18): 0 below α, 1 above β, linear in between."""
    return ((r - alpha) / (beta - alpha)).clamp(0, 1)


def yarn_theta(theta: Tensor, factor: float, context: int, alpha: float, beta: float) -> Tensor:
    """NTK-by-parts (YaRN eq. 20): dimensions with many rotations in the trained context (r(d) = L / λ_d > β,
    eq. 17) keep θ_d, so local order stays sharp; those with less than α rotations are interpolated like PI."""
    gamma = yarn_ramp(context / (2 * math.pi / theta), alpha, beta)
    return (1 - gamma) * theta / factor + gamma * theta


def yarn_magnitude(factor: float) -> float:
    """√(1/t) = 0.1 ln(s) + 1 (YaRN eq. 22), applied to both q and k, so the logits are divided by t (eq. 21)."""
    return 0.1 * math.log(factor) + 1


@PE_REGISTRY.register("rope", RoPEConfig)
class RoPE(PositionalEncoding):
    def __init__(self, cfg: RoPEConfig, model_cfg) -> None:
        super().__init__(cfg, model_cfg)
        head_dim = model_cfg.n_embd // model_cfg.n_head
        if head_dim % 2:
            raise ValueError(f"rope needs an even head dimension (n_embd / n_head), got {head_dim}")
        scaling, s = cfg.scaling, cfg.scaling.factor
        theta = rope_theta(cfg.base, head_dim)
        self.position_scale = 1.0  # positions m -> m / position_scale (PI)
        self.magnitude = 1.0  # cos and sin times this (YaRN's temperature)
        if scaling.is_plain:  # factor 1, or type none: plain RoPE, bit for bit
            pass
        elif scaling.type == "linear":
            self.position_scale = s
        elif scaling.type == "ntk":
            theta = rope_theta(ntk_base(cfg.base, s, head_dim), head_dim)
        elif scaling.type == "yarn":
            context = scaling.original_context or model_cfg.block_size
            theta = yarn_theta(theta, s, context, scaling.beta_slow, scaling.beta_fast)
            self.magnitude = yarn_magnitude(s)
        # Non-persistent: scaling is an inference-time setting, so any checkpoint loads with any scaling.
        self.register_buffer("theta", theta, persistent=False)
        self._grow(model_cfg.block_size)

    def _grow(self, length: int) -> None:
        positions = torch.arange(length, dtype=torch.float64, device=self.theta.device)
        if self.position_scale != 1:
            positions = positions / self.position_scale
        angles = positions[:, None] * self.theta
        cos, sin = angles.cos(), angles.sin()
        if self.magnitude != 1:
            cos, sin = cos * self.magnitude, sin * self.magnitude
        self.register_buffer("cos", cos.float(), persistent=False)  # [L, D/2]
        self.register_buffer("sin", sin.float(), persistent=False)

    def prepare(self, seq_end: int) -> None:
        if seq_end > self.cos.shape[0]:
            self._grow(max(seq_end, 2 * self.cos.shape[0]))

    def rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        cos, sin = self.cos[pos].to(x.dtype), self.sin[pos].to(x.dtype)  # [T, D/2]
        x_even, x_odd = x.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = (x_even * cos - x_odd * sin, x_even * sin + x_odd * cos)
        return torch.stack(rotated, dim=-1).flatten(-2)

    variant_keys = ("scaling",)

    def variant_name(self) -> str | None:
        scaling = self.cfg.scaling
        return None if scaling.is_plain else f"{scaling.type}×{scaling.factor:g}"
