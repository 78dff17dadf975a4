"""Model FLOPs per token and MFU.

FLOPs per token of a training step (forward + backward), PaLM (Chowdhery et al. 2022) appendix B, as
nanoGPT's `estimate_mfu`:
    6·N + 12·L·T·C
N = parameters that take part in matmuls: all of them except position-embedding lookup tables (the tied
wte/lm_head matrix counts once, for the lm_head matmul), L = layers, T = context length, C = n_embd.
The 12·L·T·C term is attention's QKᵀ and AV matmuls (2 matmuls × 2 FLOPs/MAC × 3 for fwd+bwd × T·C per
layer). It ignores the causal mask's halving, Linformer's compression and the PE's own cost, so it is the
same for every PE × attention and MFU compares like with like.

MFU = achieved model FLOP/s ÷ the GPU's dense bf16 peak (table below, vendor datasheets, no sparsity).
"""

from __future__ import annotations

import torch

PEAK_BF16_FLOPS = {  # substring of torch.cuda.get_device_name() -> dense bf16 FLOP/s
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,  # fp16 tensor cores (no bf16)
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def training_flops_per_token(matmul_params: int, n_layer: int, n_embd: int, context_len: int) -> float:
    """6·N + 12·L·T·C, with N = matmul_params (see the module docstring)."""
    return 6 * matmul_params + 12 * n_layer * context_len * n_embd


def flops_per_token(model: torch.nn.Module, context_len: int) -> float:
    cfg = model.config
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    lookup_tables = [m.weight for m in embeddings if m is not model.wte]
    n_params = sum(p.numel() for p in model.parameters()) - sum(t.numel() for t in lookup_tables)
    return training_flops_per_token(n_params, cfg.n_layer, cfg.n_embd, context_len)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # no meaningful peak for CPUs; MFU is reported as null
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
