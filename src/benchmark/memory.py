"""The extra memory one training step needs on top of what stays resident (weights, AdamW moments).

- CUDA: `torch.cuda.max_memory_allocated()` during the step minus `memory_allocated()` before it, i.e. what
  PyTorch's caching allocator handed out for activations, gradients and temporaries.
- CPU: PyTorch has no allocator statistics there and tracemalloc cannot see its allocations, so we use the
  kernel's peak resident set size: `malloc_trim(0)` returns freed heap pages to the OS (so the step cannot
  silently reuse pages that are already resident), writing "5" to /proc/self/clear_refs resets VmHWM
  (Linux ≥ 4.0), and the step's peak is VmHWM afterwards minus VmRSS before. It counts every page the
  process touches during the step, PyTorch's or not, by whole pages.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from src.device import release_freed_memory

MIB = 2**20


def _proc_status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


def _cpu_step_peak_mib(step: Callable[[], None]) -> float:
    release_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status_mib("VmRSS")
    step()
    return _proc_status_mib("VmHWM") - before


def _cuda_step_peak_mib(step: Callable[[], None], device: torch.device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / MIB


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda max_memory_allocated during the step - memory_allocated before it"
    return "peak RSS (VmHWM after clear_refs and malloc_trim) during the step - RSS before it"


def step_peak_mib(step: Callable[[], None], device: torch.device) -> float:
    """Run `step` once and return the memory it needed beyond what was allocated before it, in MiB."""
    if device.type == "cuda":
        return _cuda_step_peak_mib(step, device)
    return _cpu_step_peak_mib(step)


def resident_state_mib(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """Weights plus optimizer state (AdamW: two moments per weight), counted from the tensors themselves."""
    tensors = list(model.parameters()) + [
        t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)
    ]
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}  # tied weights count once
    return sum(unique.values()) / MIB
