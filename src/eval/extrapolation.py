"""Length extrapolation: validation loss at context lengths m x block_size, m in cfg.multipliers.

A model trained on block_size tokens is scored on longer windows of the same val split (same fixed
budget of cfg.num_tokens tokens per length, same window layout as val_loss.py). The loss at m > 1 shows
whether the positional encoding carries over to positions never seen in training (cf. ALiBi, Press et
al. 2022, Fig. 1). A PE with a hard limit (learned absolute positions: model.max_context == block_size)
cannot run longer windows: its value is None ("not applicable"), as it is when the val split is too
short for one window of that length.
"""

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch import nn

from src.eval.config import ExtrapolationConfig
from src.eval.val_loss import count_windows, evaluate_loss
from src.metrics import extrapolation_context_key, extrapolation_loss_key

log = logging.getLogger(__name__)


def evaluate_extrapolation(model: nn.Module, tokens: np.ndarray, cfg: ExtrapolationConfig,
                           device: str | torch.device, autocast: Callable[[], AbstractContextManager] = nullcontext
                           ) -> dict[str, float | int | None]:
    """{extrapolation/loss_x{m}: loss or None, extrapolation/context_x{m}: m * block_size} for every m."""
    results = {}
    for m in cfg.multipliers:
        context_len = m * model.config.block_size
        results[extrapolation_context_key(m)] = context_len
        results[extrapolation_loss_key(m)] = None
        if model.max_context is not None and context_len > model.max_context:
            continue  # the PE has no positions beyond max_context
        if count_windows(len(tokens), cfg.num_tokens, context_len) == 0:
            log.warning("extrapolation x%d skipped: the val split holds %d tokens, fewer than one window of "
                        "%d + 1", m, len(tokens), context_len)
            continue
        # Fewer windows per pass at longer contexts keep the memory per forward pass about the same.
        batch_size = max(1, cfg.batch_size // m)
        results[extrapolation_loss_key(m)] = evaluate_loss(model, tokens, context_len, cfg.num_tokens, batch_size,
                                                           device, autocast)
    return results
