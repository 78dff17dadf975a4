"""The one interface every attention mechanism implements.

`forward(q, k, v, q_pos, k_pos, pe)` gets per-head queries [B, H, Tq, D] and keys/values [B, H, Tk, D]
(already rotated by the PE where it rotates), their absolute positions [Tq] / [Tk], and the PE, whose
`bias` it must add to the scores when `pe.has_bias`. It returns [B, H, Tq, D] and must be causal: a query
never sees a key at a later position.

`training_backend(pe, device, dtype)` names the path a training forward takes (`attention_backend`).
`attention_weights(...)` returns the probabilities a forward applies, for diagnostics (src/eval/details.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
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

    def attention_weights(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, pe
                          ) -> tuple[Tensor, Tensor]:
        """The attention probabilities [B, H, Tq, Tk'] that `forward` (without dropout) applies to the same
        inputs, and the position [Tk'] of each key they weigh (a compressed key sits at a representative
        position). Default: softmax(QKᵀ/√d + bias + causal mask) over the keys, the rule of regular and flash
        attention; a mechanism that attends to other keys overrides it."""
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.size(-1))
        if pe.has_bias:
            scores = scores + pe.bias_matrix(q_pos, k_pos).float()
        return scores.masked_fill(~causal_mask(q_pos, k_pos), float("-inf")).softmax(dim=-1), k_pos.float()

    def training_backend(self, pe, device: torch.device, dtype: torch.dtype) -> str:
        """The path a training forward (a backward follows) takes with `pe` on `device` with attention inputs of
        `dtype`; see `attention_backend`. Default: the scores written out."""
        return "explicit"


def attention_backend(model, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The attention path the TRAINING forward of `model` (a GPT; compiled or DDP-wrapped is fine) takes on
    `device`, FlexAttention's fallback included:

    - "flex": FlexAttention with the PE's bias as score_mod (flash with a bias PE, Linformer; CUDA, no
      attention dropout, FlexAttention available there);
    - "sdpa": `scaled_dot_product_attention` with `is_causal` (flash with a PE without bias);
    - "sdpa+bias-mask": SDPA with a float mask, bias + causal −inf (flash with a bias PE off the flex path);
    - "linformer-dense": Linformer's explicit chunked path (off the flex path);
    - "explicit": softmax(QKᵀ/√d + bias + mask)·V written out (regular).

    Layers on different paths (not the case today) give their names joined by ", ", in layer order.
    `dtype`: the attention's compute dtype; None: the autocast dtype if autocast is on for `device` (call it
    inside the training autocast), else the model's parameter dtype. Call it eagerly, before the first
    training step: where a layer would use FlexAttention this runs its probe (`flex_available`), which a
    compiled model needs, since inside its graph a FlexAttention failure cannot fall back.
    """
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    device = torch.device(device)
    if dtype is None:
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        else:
            dtype = next(model.parameters()).dtype
    names = [mechanism.training_backend(pe, device, dtype) for mechanism, pe in model.attention_layers()]
    return ", ".join(dict.fromkeys(names))
