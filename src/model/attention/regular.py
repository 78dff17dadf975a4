"""Regular attention: softmax(QKᵀ/√d + bias + causal mask)·V, written out (Vaswani et al. 2017, eq. 1).

The readable reference that every other mechanism is tested against. Materialises the [B, H, Tq, Tk]
score matrix.
"""

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from src.model.attention.base import ATTENTION_REGISTRY, AttentionConfig, AttentionMechanism, causal_mask


@dataclass
class RegularConfig(AttentionConfig):
    pass


@ATTENTION_REGISTRY.register("regular", RegularConfig)
class RegularAttention(AttentionMechanism):
    def forward(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, pe) -> Tensor:
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        if pe.has_bias:
            scores = scores + pe.bias_matrix(q_pos, k_pos).to(scores.dtype)
        scores = scores.masked_fill(~causal_mask(q_pos, k_pos), float("-inf"))
        probs = F.dropout(scores.softmax(dim=-1), p=self.dropout, training=self.training)
        return probs @ v
