"""The pieces of `trainer.micro_batch_size=auto` that need no training state: which sizes to try, how an
out-of-memory error is recognised, how ranks agree, and the memory AdamW's state will take. The search itself
(`TrainingRun.choose_micro_batch`) tries each size on the first step's batches."""

from __future__ import annotations

import torch

from src.training.distributed import DistContext


def micro_batch_candidates(sequences: int) -> list[int]:
    """The micro-batch sizes trainer.micro_batch_size=auto tries, largest first, for `sequences` per rank and step:
    the powers of two that divide it, i.e. from grad_accum 1 down to micro-batch 1 when `sequences` is a power of
    two (every recipe here); each halving doubles the accumulation and keeps total_batch_tokens exact."""
    first = sequences & -sequences  # the largest power of two dividing it
    return [first >> i for i in range(first.bit_length())]


def any_rank_out_of_memory(out_of_memory: bool, dist: DistContext, device: torch.device) -> bool:
    """Whether this rank or any other ran out of memory (a MAX all-reduce of the flag): every rank takes the same
    branch, retrying the smaller size or going on, and so they all choose the same micro-batch."""
    if not dist.enabled:
        return out_of_memory
    flag = torch.tensor(float(out_of_memory), device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def is_out_of_memory(err: BaseException) -> bool:
    """A device out-of-memory error (torch.OutOfMemoryError is torch.cuda.OutOfMemoryError), also as the cause of
    another (torch.compile raises its errors `from` the original)."""
    while err is not None and not isinstance(err, torch.OutOfMemoryError):
        err = err.__cause__
    return err is not None


def optimizer_state_reserve(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor | None:
    """On an accelerator, before the first update: a block of as many bytes as AdamW's two moments per parameter
    (in its dtype) will then keep resident. None on CPU, or once the optimizer has its state."""
    if device.type == "cpu" or optimizer.state:
        return None
    nbytes = sum(2 * p.numel() * p.element_size() for group in optimizer.param_groups for p in group["params"])
    return torch.empty(nbytes, dtype=torch.uint8, device=device)
