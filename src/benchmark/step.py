"""One training step, timed: forward, backward and the AdamW update, as in src/training/trainer.py.

The optimizer step is included (it is part of every real step, and for small models the AdamW update of
the 50304 x n_embd embedding is a visible share of it); gradient clipping and accumulation are not.
Both our model and the peer go through this same code with the same optimizer settings, batch and dtype.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from src.benchmark.memory import resident_state_mib, step_peak_mib
from src.device import autocast_for
from src.training.config import TrainerConfig
from src.training.optim import build_optimizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainStep:
    """A model with its optimizer and a fixed random batch [batch, context], ready to be stepped and timed."""

    def __init__(self, model: nn.Module, batch: int, context: int, vocab_size: int, device: torch.device,
                 dtype: str, compile: bool, seed: int = 0):
        self.model = model.to(device).train()
        self.device = device
        # The trainer's AdamW (decay on >= 2-D weights, fused on CUDA) with its default hyper-parameters.
        self.optimizer = build_optimizer(self.model, TrainerConfig(), device.type)
        self.forward = torch.compile(self.model) if compile else self.model
        self.autocast = autocast_for(device, dtype)  # as the trainer: bfloat16 = autocast
        generator = torch.Generator().manual_seed(seed)
        data = torch.randint(vocab_size, (batch, context + 1), generator=generator)
        self.idx, self.targets = data[:, :-1].to(device), data[:, 1:].to(device)

    def step(self) -> None:
        with self.autocast():
            _, loss = self.forward(self.idx, self.targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def warm_up(self, steps: int) -> None:
        """Untimed steps: compilation, autotuning, lazy AdamW state, allocator growth."""
        for _ in range(steps):
            self.step()
        sync(self.device)

    def timed(self, steps: int) -> float:
        """Seconds per step, averaged over `steps` back-to-back steps."""
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return (time.perf_counter() - start) / steps

    def profile(self, steps: int, path) -> None:
        """torch.profiler over `steps` steps: the ops by self time (table) and a Chrome trace next to it."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                self.step()
            sync(self.device)
        sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        path.write_text(prof.key_averages().table(sort_by=sort_by, row_limit=30) + "\n")
        prof.export_chrome_trace(str(path.with_suffix(".trace.json")))

    def step_memory_mib(self) -> float:
        return step_peak_mib(self.step, self.device)

    def state_memory_mib(self) -> float:
        return resident_state_mib(self.model, self.optimizer)
