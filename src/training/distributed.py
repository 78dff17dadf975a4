"""DDP set-up from the environment: torchrun, or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from src.errors import ConfigError


@dataclass
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def context_from_env() -> DistContext:
    """This process's ranks as torchrun (or export_submitit_env) sets RANK / LOCAL_RANK / WORLD_SIZE."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistContext()
    return DistContext(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)


def resolve_device(requested: str, local_rank: int, key: str = "trainer.device") -> torch.device:
    """The device for `requested` (auto | cpu | cuda | cuda:N | mps); ConfigError, naming the config `key`, if
    this machine has no such device."""
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


def export_submitit_env() -> bool:
    """Inside a submitit job with several tasks (SLURM: one task per GPU), export RANK / WORLD_SIZE /
    LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the SLURM variables so that init_distributed() sees them.
    A no-op outside submitit, for a single task, or when a launcher (torchrun) already set WORLD_SIZE."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or "WORLD_SIZE" in os.environ:
        return False
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return False
    import submitit

    # Keep every GPU visible: init_distributed() picks cuda:LOCAL_RANK itself.
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def init_distributed(device_request: str) -> tuple[DistContext, torch.device]:
    ctx = context_from_env()
    device = resolve_device(device_request, ctx.local_rank)
    if not ctx.enabled:
        return ctx, device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ctx, device


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.AVG)
    return value


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
