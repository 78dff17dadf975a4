"""Validation loss on a fixed token budget: the same windows for every run, batch size and world size.

The first `num_tokens` tokens of the val split are cut into windows of context_len + 1 tokens with a
stride of context_len (window i = tokens[i*L : i*L + L + 1], L = context_len): the inputs never overlap
and every token after the first is predicted exactly once, with between 0 and L-1 tokens of context.
This is the layout of src/data/loader.py. The loss is the mean over all predicted tokens.

Under torch.distributed, rank r scores windows r, r + world_size, ... and the sums are all-reduced, so
the number is the same as on one process (up to float summation order). Every rank must call it.
"""

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


def val_tokens(shard_dir: str | Path) -> np.ndarray:
    """The val split as one token array: its val_*.bin shards (raw uint16) memory-mapped, in order."""
    files = sorted(Path(shard_dir).glob("val_*.bin"))
    if not files:
        raise FileNotFoundError(f"no val_*.bin shards in {shard_dir}: prepare the data first "
                                f"(`python -m src.data.prepare data=...`)")
    shards = [np.memmap(f, dtype=np.uint16, mode="r") for f in files]
    return shards[0] if len(shards) == 1 else np.concatenate(shards)


def count_windows(available: int, num_tokens: int, context_len: int) -> int:
    """Windows of context_len + 1 tokens in the first num_tokens of `available` tokens (at least one if
    the split holds one at all; 0 if it does not)."""
    if available < context_len + 1:
        return 0
    return max(1, (min(available, num_tokens) - 1) // context_len)


def rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sum_across_ranks(values: list[float], device: str | torch.device) -> list[float]:
    """Element-wise sum of `values` over all ranks (unchanged on a single process)."""
    if rank_and_world_size()[1] == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """model.eval() and no gradients inside; the model's previous train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def evaluate_loss(model: nn.Module, tokens: np.ndarray, context_len: int, num_tokens: int, batch_size: int,
                  device: str | torch.device,
                  autocast: Callable[[], AbstractContextManager] = nullcontext) -> float:
    """Mean next-token loss over the first num_tokens tokens of `tokens`, in windows of context_len."""
    num_windows = count_windows(len(tokens), num_tokens, context_len)
    if num_windows == 0:
        raise ValueError(f"the val split holds {len(tokens)} tokens, fewer than one window of "
                         f"context_len + 1 = {context_len + 1}; use more validation data "
                         f"(data.val_fraction / data.val_tokens)")
    rank, world_size = rank_and_world_size()
    mine = np.arange(rank, num_windows, world_size)
    loss_sum = 0.0
    with evaluating(model):
        for first in range(0, len(mine), batch_size):
            starts = mine[first : first + batch_size] * context_len
            rows = [tokens[start : start + context_len + 1] for start in starts]
            batch = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
            with autocast():
                _, loss = model(batch[:, :-1], batch[:, 1:])
            loss_sum += loss.item() * len(rows) * context_len
    loss_sum, num_predicted = sum_across_ranks([loss_sum, len(mine) * context_len], device)
    return loss_sum / num_predicted
