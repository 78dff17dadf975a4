"""The one interface every attention mechanism implements.

`forward(q, k, v, q_pos, k_pos, pe)` gets per-head queries [B, H, Tq, D] and keys/values [B, H, Tk, D]
(already rotated by the PE where it rotates), their absolute positions [Tq] / [Tk], and the PE, whose
`bias` it must add to the scores when `pe.has_bias`. It returns [B, H, Tq, D] and must be causal: a query
never sees a key at a later position.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from src.model.registry import ComponentConfig, Registry


@dataclass
class AttentionConfig(ComponentConfig):
    pass


ATTENTION_REGISTRY: Registry[AttentionMechanism] = Registry(
    "attention mechanism", "model/attention", "src.model.attention"
)


def causal_mask(q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """Boolean [..., Tq, Tk]: True where the key may be attended to (key position ≤ query position)."""
    return k_pos[..., None, :] <= q_pos[..., :, None]


class AttentionMechanism(nn.Module):
    def __init__(self, cfg: AttentionConfig, model_cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.dropout = model_cfg.dropout

    def forward(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, pe) -> Tensor:
        raise NotImplementedError
