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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
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


@dataclass
class PositionLosses:
    """Next-token losses summed per input position of a window: `total[p]` over the `count[p]` predictions made
    at position p (after reading p + 1 tokens). Their ratio is the loss by position; all summed, the mean loss."""

    total: np.ndarray  # float64 [T]
    count: np.ndarray  # int64 [T]

    @property
    def mean(self) -> float:
        return float(self.total.sum() / self.count.sum())

    def by_position(self) -> list[float | None]:
        return [float(t / n) if n else None for t, n in zip(self.total, self.count)]


def score_windows(model: nn.Module, tokens: np.ndarray, context_len: int, starts: np.ndarray, first_scored: np.ndarray,
                  batch_size: int, device: str | torch.device,
                  autocast: Callable[[], AbstractContextManager] = nullcontext) -> PositionLosses:
    """Windows tokens[s : s + context_len + 1] for s in `starts`; window i scores its predictions at positions
    first_scored[i] … context_len − 1 (the earlier ones are context only). Rank r of a torch.distributed group
    takes windows r, r + world_size, …; the sums are all-reduced, so every rank returns the same totals."""
    rank, world_size = rank_and_world_size()
    mine = np.arange(rank, len(starts), world_size)
    total = torch.zeros(context_len, dtype=torch.float64, device=device)
    count = torch.zeros(context_len, dtype=torch.float64, device=device)
    position = torch.arange(context_len, device=device)
    with evaluating(model):
        for first in range(0, len(mine), batch_size):
            batch_windows = mine[first : first + batch_size]
            rows = [tokens[start : start + context_len + 1] for start in starts[batch_windows]]
            batch = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
            with autocast():
                logits = model(batch[:, :-1])
            # The loss of GPT.forward (float cross-entropy of the logits), per token instead of averaged.
            losses = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].reshape(-1), reduction="none")
            scored = position[None, :] >= torch.from_numpy(first_scored[batch_windows]).to(device)[:, None]
            total += (losses.view(len(rows), context_len).double() * scored).sum(0)
            count += scored.sum(0)
    if world_size > 1:
        dist.all_reduce(total)
        dist.all_reduce(count)
    return PositionLosses(total.cpu().numpy(), count.cpu().numpy().astype(np.int64))


def non_overlapping_windows(num_windows: int, context_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, first scored position) of the module docstring's layout: every position of every window scored."""
    return np.arange(num_windows) * context_len, np.zeros(num_windows, dtype=np.int64)


def sliding_windows(num_targets: int, context_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, first scored position) of windows that predict the same tokens 1 … num_targets as the
    non-overlapping layout, each exactly once: the first window all of its context_len, every later one (moved
    on by `stride`) only its last `stride` positions, so each of those has between context_len − stride and
    context_len − 1 tokens of context (the last window, ending at num_targets, may score fewer). stride ==
    context_len is the non-overlapping layout itself."""
    starts, first_scored, scored_until = [0], [0], context_len
    while scored_until < num_targets:
        new = min(stride, num_targets - scored_until)
        starts.append(scored_until + new - context_len)
        first_scored.append(context_len - new)
        scored_until += new
    return np.array(starts), np.array(first_scored)


def loss_by_position(model: nn.Module, tokens: np.ndarray, context_len: int, num_tokens: int, batch_size: int,
                     device: str | torch.device, autocast: Callable[[], AbstractContextManager] = nullcontext,
                     stride: int | None = None) -> PositionLosses:
    """The losses of the first num_tokens tokens of `tokens` in windows of context_len: non-overlapping (the
    module docstring's layout), or sliding by `stride` (`sliding_windows`: the same tokens predicted, each with
    more context)."""
    num_windows = count_windows(len(tokens), num_tokens, context_len)
    if num_windows == 0:
        raise ValueError(f"the val split holds {len(tokens)} tokens, fewer than one window of "
                         f"context_len + 1 = {context_len + 1}; use more validation data "
                         f"(data.val_fraction / data.val_tokens)")
    if stride is None:
        starts, first_scored = non_overlapping_windows(num_windows, context_len)
    else:
        starts, first_scored = sliding_windows(num_windows * context_len, context_len, stride)
    return score_windows(model, tokens, context_len, starts, first_scored, batch_size, device, autocast)


def evaluate_loss(model: nn.Module, tokens: np.ndarray, context_len: int, num_tokens: int, batch_size: int,
                  device: str | torch.device,
                  autocast: Callable[[], AbstractContextManager] = nullcontext) -> float:
    """Mean next-token loss over the first num_tokens tokens of `tokens`, in windows of context_len."""
    return loss_by_position(model, tokens, context_len, num_tokens, batch_size, device, autocast).mean
