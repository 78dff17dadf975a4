"""Fused attention: PyTorch's `scaled_dot_product_attention`, and FlexAttention for bias PEs on CUDA.

- No bias (learned, sinusoidal, rope, nope): SDPA with `is_causal` (FlashAttention-2 kernels on GPU).
- Bias PEs, training on CUDA: compiled FlexAttention with the PE's elementwise `score_mod_bias` and a
  causal block mask (built once, shared by the layers and steps), so no [B, H, T, T] bias is materialised
  (Dong et al. 2024, "Flex Attention"); FIRE looks its bias up in one batch-independent [H, T, T] table per
  layer.
- Bias PEs otherwise (inference, CPU, FlexAttention unavailable on the GPU — see `flex.py`; FlexAttention
  has no backward on CPU in torch 2.13): SDPA with a float mask (bias + causal −inf) that gives the same
  numbers, fused but with an [H, T, T] bias.

Training backends (`attention_backend`): "sdpa", "flex", "sdpa+bias-mask".
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from src.model.attention.base import ATTENTION_REGISTRY, AttentionConfig, AttentionMechanism, causal_mask
from src.model.attention.flex import flex_applies, flex_attention_with_bias, flex_or_none, flex_trains


@dataclass
class FlashConfig(AttentionConfig):
    use_flex: bool = True  # FlexAttention score_mod for bias PEs when training on CUDA (no [B, H, T, T] scores)


@ATTENTION_REGISTRY.register("flash", FlashConfig)
class FlashAttention(AttentionMechanism):
    def training_backend(self, pe, device: torch.device, dtype: torch.dtype) -> str:
        if not pe.has_bias:
            return "sdpa"
        return "flex" if flex_trains(self.cfg.use_flex, device, dtype, self.dropout) else "sdpa+bias-mask"

    def forward(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, pe) -> Tensor:
        dropout_p = self.dropout if self.training else 0.0
        if pe.has_bias:
            if flex_applies(self.cfg.use_flex, q, dropout_p):
                out = flex_or_none(lambda: self._flex_forward(q, k, v, q_pos, k_pos, pe), q)
                if out is not None:  # None: FlexAttention failed just now; the dense path below redoes the call
                    return out
            bias = pe.bias_matrix(q_pos, k_pos).to(q.dtype)
            # 4-D [1, H, Tq, Tk]: with a 3-D mask the CPU SDPA falls back to its slow math kernel.
            mask = bias.masked_fill(~causal_mask(q_pos, k_pos), float("-inf"))[None]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        if q.size(-2) == k.size(-2):  # no KV cache: queries and keys share positions
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(q_pos, k_pos), dropout_p=dropout_p)

    @staticmethod
    def _flex_forward(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, pe) -> Tensor:
        if q.size(-2) == k.size(-2):
            # Queries and keys share their (increasing) positions: the causal rule is one of indices alone, so
            # one block mask per length serves every layer and step.
            return flex_attention_with_bias(q, k, v, q_pos, k_pos, pe, visible=lambda q_idx, kv_idx: kv_idx <= q_idx,
                                            mask_key="causal")
        return flex_attention_with_bias(q, k, v, q_pos, k_pos, pe,
                                        visible=lambda q_idx, kv_idx: k_pos[kv_idx] <= q_pos[q_idx])
