"""A key/value cache for incremental decoding: each layer's keys (already rotated) and values so far."""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Holds [B, H, T, D] keys and values per layer. `length` counts the tokens the model has consumed;
    the next forward pass continues at position `length`."""

    def __init__(self, n_layer: int):
        self.keys: list[Tensor | None] = [None] * n_layer
        self.values: list[Tensor | None] = [None] * n_layer
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's keys/values of `layer`; return all of them."""
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=-2)
            v = torch.cat((self.values[layer], v), dim=-2)
        self.keys[layer], self.values[layer] = k, v
        return k, v
