"""T5 relative position bias (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", JMLR, §2.1).

score(i, j) += b[bucket(i − j), h]: one learned scalar per (bucket, head). Causal bucketing as T5's decoder
(Mesh TensorFlow / HF `T5Attention._relative_position_bucket`, bidirectional=False), with n = max(⌊i − j⌋, 0)
and max_exact = num_buckets // 2:
  bucket = n                                                                         if n < max_exact
  bucket = min(max_exact + ⌊log(n / max_exact) / log(max_distance / max_exact) · (num_buckets − max_exact)⌋,
               num_buckets − 1)                                                      otherwise
so nearby offsets are exact, farther ones share log-spaced buckets, and every n ≥ max_distance shares the last:
any length runs. The floor makes integer positions give exactly the reference's buckets and Linformer's
fractional slot positions a valid one; future keys (masked anyway) fall in bucket 0.

One table for the whole model, as T5 (only its first layer has `relative_attention_bias`; the later layers
reuse that layer's `position_bias`). Init as HF's `T5PreTrainedModel._init_weights`:
`init.normal_(module.relative_attention_bias.weight, mean=0.0, std=factor * ((d_model) ** -0.5))`, factor 1.
The bias is added to QKᵀ/√d like the other bias PEs (T5 itself drops the 1/√d and folds it into its q init).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from src.errors import ConfigError
from src.model.pe.base import PE_REGISTRY, PEConfig, PositionalEncoding


@dataclass
class T5BiasConfig(PEConfig):
    num_buckets: int = 32
    max_distance: int = 128  # distances from here on share the last bucket

    def __post_init__(self) -> None:
        if not self.num_buckets >= 2:  # max_exact = num_buckets // 2 must be ≥ 1
            raise ConfigError(f"model.pe.num_buckets must be at least 2, got {self.num_buckets}")
        if not self.max_distance > self.num_buckets // 2:  # else the log-spaced buckets have no range
            raise ConfigError(f"model.pe.max_distance must exceed model.pe.num_buckets // 2 "
                              f"({self.num_buckets // 2}), got {self.max_distance}")


def relative_position_bucket(distance: Tensor, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """T5's causal bucket (long) of each query − key distance (float or int), elementwise."""
    n = torch.floor(distance.float()).clamp(min=0)
    max_exact = num_buckets // 2
    # Same float32 ops as the reference; the clamp inside the log only keeps the unused branch finite (n < max_exact).
    large = max_exact + (torch.log(n.clamp(min=max_exact) / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    return torch.where(n < max_exact, n.long(), large.clamp(max=num_buckets - 1))


@PE_REGISTRY.register("t5_bias", T5BiasConfig)
class T5Bias(PositionalEncoding):
    has_bias = True

    def __init__(self, cfg: T5BiasConfig, model_cfg) -> None:
        super().__init__(cfg, model_cfg)
        self.table = nn.Parameter(torch.empty(cfg.num_buckets, model_cfg.n_head))
        nn.init.normal_(self.table, mean=0.0, std=model_cfg.n_embd ** -0.5)

    def bucket(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        return relative_position_bucket(q_pos - k_pos, self.cfg.num_buckets, self.cfg.max_distance)

    def bias(self, h: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        return self.table[self.bucket(q_pos, k_pos), h]
