"""What running on a device needs, for training, evaluation, the benchmark and chat alike: which device, the
autocast context, and the memory figures (peak, and giving freed memory back to the OS)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import resource

import torch

from src.errors import ConfigError


def resolve_device(requested: str, local_rank: int, key: str = "trainer.device") -> torch.device:
    """The device for `requested` (auto | cpu | cuda | cuda:N | mps); ConfigError, naming the config `key`, if
    this machine has no such device. `cuda` without an index is this rank's GPU, cuda:LOCAL_RANK, as for auto
    (else every DDP rank would share cuda:0)."""
    if requested == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if requested != "auto":
        return _available_device(requested, key)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _available_device(requested: str, key: str) -> torch.device:
    fix = f"use {key}=cpu, or {key}=auto (the best device there is)"
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", requested):
        raise ConfigError(f"{key}={requested} is not a device: use auto, cpu, cuda, cuda:N or mps")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={requested} but CUDA is not available on this machine (torch {torch.__version__}): "
                          f"{fix}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{key}={requested} but this machine has {torch.cuda.device_count()} CUDA device(s): "
                          f"use {key}=cuda:0 .. cuda:{torch.cuda.device_count() - 1}, or {key}=auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}=mps but MPS (Apple GPU) is not available on this machine: {fix}")
    return device


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's peak RSS


def autocast_for(device: torch.device, dtype: str):
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def release_freed_memory() -> None:
    """Collect garbage, then have glibc return freed heap pages to the OS.

    Without the trim, glibc keeps the ~2 models' worth of memory a load peaks at (the model plus the
    state dict read from disk) and RSS settles at ~2.5 models with one resident (measured, docs/CHAT.md).
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the allocator keeps its own policy
        pass
