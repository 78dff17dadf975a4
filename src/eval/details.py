"""What the final evaluation measures beyond single numbers: eval_details.json (README "Run record").

- `loss_by_position`: for every extrapolation context m x L the PE can run, the mean loss of the predictions
  made at each input position 0 … m·L − 1 of the non-overlapping windows (val_loss.py), and how many were
  averaged: where a PE breaks, not only whether it does. Free: the extrapolation pass computes them anyway.
- `bias_by_distance` (PEs with an attention-score bias): the bias each head adds at distances 0 … 4L − 1, for
  a query at position 4L − 1 (FIRE's bias depends on the query position too), in the first and the last layer.
  One bias evaluation per layer.
- `attention`: per context m x L in details.attention_multipliers, per layer and head, the attention entropy
  (mean over queries of −Σ p·ln p, nats) and the mean attention distance (mean over queries of Σ p·(q − k),
  tokens) of the probabilities the mechanism applies (`AttentionMechanism.attention_weights`: a Linformer
  slot counts at its chunk's centre), from details.attention_windows validation windows. Cost: one forward
  pass per window plus one [H, T, T] softmax per layer, i.e. ~attention_windows / (num_tokens / (m·L)) of the
  extrapolation pass.

Rank 0 writes the file; under torch.distributed every rank computes the same numbers (the same windows), so
no collective is needed and the other ranks skip it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch import nn

from src.eval.config import DetailsConfig
from src.eval.val_loss import PositionLosses, count_windows, evaluating


def loss_by_position_section(by_position: dict[int, PositionLosses], block_size: int) -> dict:
    return {str(m): {"context": m * block_size, "loss": losses.by_position(), "count": losses.count.tolist()}
            for m, losses in sorted(by_position.items())}


def bias_by_distance(model: nn.Module, multiplier: int) -> dict | None:
    """The first and last layer's bias per head against the distance q − k, for the query at position
    multiplier·L − 1; None when the PE adds no bias."""
    layers = model.attention_layers()
    if not layers[0][1].has_bias:
        return None
    query = multiplier * model.config.block_size - 1
    distance = torch.arange(query + 1)
    device = next(model.parameters()).device
    q_pos = torch.tensor([query], device=device)
    k_pos = (query - distance).to(device)
    shown = sorted({0, len(layers) - 1})
    with torch.no_grad():
        biases = {str(i): layers[i][1].bias_matrix(q_pos, k_pos)[:, 0, :].float().cpu().tolist() for i in shown}
    return {"query_position": query, "distance": distance.tolist(), "layers": biases}


def attention_statistics(model: nn.Module, tokens: np.ndarray, context_len: int, num_windows: int,
                         device: str | torch.device, autocast: Callable[[], AbstractContextManager] = nullcontext
                         ) -> dict | None:
    """Entropy and mean distance per layer and head (lists [layer][head]) over the first `num_windows`
    non-overlapping windows of context_len; None when the split is shorter than one window."""
    num_windows = min(num_windows, count_windows(len(tokens), len(tokens), context_len))
    if num_windows < 1:
        return None
    layers = model.attention_layers()
    n_head = model.config.n_head
    entropy = torch.zeros(len(layers), n_head, dtype=torch.float64)
    distance = torch.zeros(len(layers), n_head, dtype=torch.float64)

    def observer(layer: int):
        def hook(mechanism: nn.Module, args: tuple) -> None:
            q, k, v, q_pos, k_pos, pe = args
            probs, key_pos = mechanism.attention_weights(q, k, v, q_pos, k_pos, pe)  # [B, H, Tq, Tk']
            offsets = q_pos.float()[:, None] - key_pos[None, :]  # q − k, [Tq, Tk']
            entropy[layer] += -torch.special.xlogy(probs, probs).sum(-1).mean((0, 2)).double().cpu()
            distance[layer] += (probs * offsets).sum(-1).mean((0, 2)).double().cpu()
        return hook

    handles = [mechanism.register_forward_pre_hook(observer(i)) for i, (mechanism, _) in enumerate(layers)]
    try:
        with evaluating(model):
            for window in range(num_windows):  # one window per pass: the [B, H, T, T] probabilities stay small
                row = tokens[window * context_len : window * context_len + context_len]
                with autocast():
                    model(torch.from_numpy(row.astype(np.int64))[None].to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {"context": context_len, "windows": num_windows, "entropy": (entropy / num_windows).tolist(),
            "mean_distance": (distance / num_windows).tolist()}


def evaluation_details(model: nn.Module, tokens: np.ndarray, cfg: DetailsConfig,
                       by_position: dict[int, PositionLosses], device: str | torch.device,
                       autocast: Callable[[], AbstractContextManager] = nullcontext) -> dict:
    """The content of eval_details.json (module docstring)."""
    block_size = model.config.block_size
    attention = {}
    for m in cfg.attention_multipliers:
        context_len = m * block_size
        if model.max_context is not None and context_len > model.max_context:
            continue
        stats = attention_statistics(model, tokens, context_len, cfg.attention_windows, device, autocast)
        if stats is not None:
            attention[str(m)] = stats
    return {
        "block_size": block_size,
        "loss_by_position": loss_by_position_section(by_position, block_size),
        "bias_by_distance": bias_by_distance(model, cfg.bias_multiplier),
        "attention": attention,
    }
