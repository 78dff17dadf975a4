"""ALiBi: attention with linear biases (Press et al. 2022, "Train Short, Test Long", §3).

score(i, j) += −m_h · (i − j). For n heads a power of two, m_h = 2^(−8h/n), h = 1..n (a geometric
sequence starting at 2^(−8/n)). For other n (footnote / reference code): the slopes of the closest
lower power of two p, followed by every other slope of 2p until n slopes are chosen.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from src.model.pe.base import PE_REGISTRY, PEConfig, PositionalEncoding


def alibi_slopes(n_head: int) -> list[float]:
    def power_of_two_slopes(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (h + 1) for h in range(n)]

    if math.log2(n_head).is_integer():
        return power_of_two_slopes(n_head)
    lower = 2 ** math.floor(math.log2(n_head))
    return power_of_two_slopes(lower) + power_of_two_slopes(2 * lower)[0::2][: n_head - lower]


@dataclass
class ALiBiConfig(PEConfig):
    pass


@PE_REGISTRY.register("alibi", ALiBiConfig)
class ALiBi(PositionalEncoding):
    has_bias = True

    def __init__(self, cfg: ALiBiConfig, model_cfg) -> None:
        super().__init__(cfg, model_cfg)
        self.register_buffer("slopes", torch.tensor(alibi_slopes(model_cfg.n_head)), persistent=False)

    def bias(self, h: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        # |i − j|: equal to i − j wherever the causal mask lets attention through, finite elsewhere.
        return -self.slopes[h] * (q_pos - k_pos).abs()
