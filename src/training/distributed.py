"""DDP set-up from the environment: torchrun, or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from src.device import resolve_device


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
