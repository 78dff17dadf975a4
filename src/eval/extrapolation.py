"""Length extrapolation: validation loss at context lengths m x block_size, m in cfg.multipliers.

A model trained on block_size tokens is scored on longer windows of the same val split (same fixed
budget of cfg.num_tokens tokens per length, same window layout as val_loss.py). The loss at m > 1 shows
whether the positional encoding carries over to positions never seen in training (cf. ALiBi, Press et
al. 2022, Fig. 1). A PE with a hard limit (learned absolute positions: model.max_context == block_size)
cannot run longer windows: its value is None ("not applicable"), as it is when the val split is too
short for one window of that length.

Two layouts score the same tokens (val_loss.py):
- non-overlapping windows (`extrapolation/loss_x{m}`): every position 0 … m·L − 1 is scored, so the loss by
  position shows where a PE breaks; the first tokens of each window have almost no context (Press et al.'s
  "early token curse");
- sliding windows (`extrapolation/sliding_loss_x{m}`, with cfg.stride): after the first window only the last
  `stride` positions of each window are scored, each with at least m·L − stride tokens of context (Press et
  al. 2022, §B; the strided perplexity of lm-eval-harness issues #369 / #1642).
"""

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch import nn

from src.errors import ConfigError
from src.eval.config import ExtrapolationConfig
from src.eval.val_loss import PositionLosses, count_windows, loss_by_position
from src.metrics import EXTRAPOLATION_STRIDE, extrapolation_context_key, extrapolation_loss_key, sliding_loss_key

log = logging.getLogger(__name__)


def check_stride(cfg: ExtrapolationConfig, block_size: int) -> None:
    """One-line error when the sliding-window stride exceeds the shortest evaluated context (a longer stride
    would skip tokens); call it before training, when block_size is known."""
    if cfg.enabled and cfg.stride is not None and cfg.multipliers:
        shortest = min(cfg.multipliers) * block_size
        if cfg.stride > shortest:
            raise ConfigError(f"eval.extrapolation.stride={cfg.stride} exceeds the shortest evaluated context, "
                              f"{min(cfg.multipliers)} x model.block_size = {shortest} tokens: use a stride <= "
                              f"{shortest} (or null for no sliding-window evaluation)")


def evaluate_extrapolation_by_position(model: nn.Module, tokens: np.ndarray, cfg: ExtrapolationConfig,
                                       device: str | torch.device,
                                       autocast: Callable[[], AbstractContextManager] = nullcontext
                                       ) -> tuple[dict[str, float | int | None], dict[int, PositionLosses]]:
    """The metrics of `evaluate_extrapolation` and, for every m the model could run, the non-overlapping
    windows' losses by position."""
    check_stride(cfg, model.config.block_size)
    results: dict[str, float | int | None] = {}
    by_position: dict[int, PositionLosses] = {}
    if cfg.stride is not None:
        results[EXTRAPOLATION_STRIDE] = cfg.stride
    for m in cfg.multipliers:
        context_len = m * model.config.block_size
        results[extrapolation_context_key(m)] = context_len
        results[extrapolation_loss_key(m)] = None
        if cfg.stride is not None:
            results[sliding_loss_key(m)] = None
        if model.max_context is not None and context_len > model.max_context:
            continue  # the PE has no positions beyond max_context
        if count_windows(len(tokens), cfg.num_tokens, context_len) == 0:
            log.warning("extrapolation x%d skipped: the val split holds %d tokens, fewer than one window of "
                        "%d + 1", m, len(tokens), context_len)
            continue
        # Fewer windows per pass at longer contexts keep the memory per forward pass about the same.
        batch_size = max(1, cfg.batch_size // m)
        by_position[m] = loss_by_position(model, tokens, context_len, cfg.num_tokens, batch_size, device, autocast)
        results[extrapolation_loss_key(m)] = by_position[m].mean
        if cfg.stride is not None:
            results[sliding_loss_key(m)] = loss_by_position(model, tokens, context_len, cfg.num_tokens, batch_size,
                                                            device, autocast, stride=cfg.stride).mean
    return results, by_position


def evaluate_extrapolation(model: nn.Module, tokens: np.ndarray, cfg: ExtrapolationConfig,
                           device: str | torch.device, autocast: Callable[[], AbstractContextManager] = nullcontext
                           ) -> dict[str, float | int | None]:
    """{extrapolation/loss_x{m}: loss or None, extrapolation/context_x{m}: m * block_size} for every m, and with
    cfg.stride {extrapolation/sliding_loss_x{m}: loss or None, extrapolation/stride: cfg.stride}."""
    return evaluate_extrapolation_by_position(model, tokens, cfg, device, autocast)[0]
