"""Import Hugging Face `GPT2LMHeadModel` weights into a learned-PE GPT with identical logits."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from src.model.config import ModelConfig
from src.model.gpt import GPT

# HF's GPT-2 uses Conv1D layers whose weights are stored [in, out]; nn.Linear wants [out, in].
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def from_hf_gpt2(source: Any, attention: str = "flash", n_head: int | None = None) -> GPT:
    """`source`: a `transformers.GPT2LMHeadModel` or its state dict.

    A bare state dict does not say the head count: pass `n_head`, or it defaults to n_embd / 64 (the
    head size of every released GPT-2). The vocabulary is kept unpadded (50257) so logits match HF's.
    """
    if hasattr(source, "state_dict"):
        n_head = n_head or source.config.n_head
        source = source.state_dict()
    sd = {re.sub(r"^transformer\.", "", k): v for k, v in source.items()}
    vocab_size, n_embd = sd["wte.weight"].shape
    n_layer = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"h\.(\d+)\.", k)))
    cfg = ModelConfig(
        n_layer=n_layer,
        n_head=n_head or n_embd // 64,
        n_embd=n_embd,
        block_size=sd["wpe.weight"].shape[0],
        vocab_size=vocab_size,
        bias=True,
        pe={"name": "learned"},
        attention={"name": attention},
    )
    model = GPT(cfg)
    ours = model.state_dict()
    loaded: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue  # causal-mask buffers of old HF versions; lm_head is tied to wte
        target = "pe.wpe.weight" if key == "wpe.weight" else key
        if target not in ours:
            raise KeyError(f"unexpected key in GPT-2 state dict: {key}")
        loaded[target] = value.t() if key.endswith(_CONV1D) else value
    missing = set(ours) - set(loaded) - {"lm_head.weight"}
    if missing:
        raise KeyError(f"GPT-2 state dict lacks: {sorted(missing)}")
    with torch.no_grad():
        for key, value in loaded.items():
            ours[key].copy_(value)
    return model
