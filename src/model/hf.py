"""Hugging Face GPT-2 <-> pegrid: `from_hf_gpt2` imports `GPT2LMHeadModel` weights into a learned-PE GPT,
`to_hf_gpt2` is its inverse (the state dict and config of a `GPT2LMHeadModel` with the same logits).

GPT-2 is one point of the grid: a learned position table and exact softmax attention. Whether a model is that
point is decided by its weights, not by its PE's name: every parameter must have a GPT-2 name and GPT-2's
position table must exist. Attention without parameters of its own is checked numerically by the exporter.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from src.model.config import ModelConfig
from src.model.gpt import GPT

# HF's GPT-2 uses Conv1D layers whose weights are stored [in, out]; nn.Linear wants [out, in].
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HF_WPE, _OUR_WPE = "wpe.weight", "pe.wpe.weight"  # the position table: GPT-2's name, and the learned PE's
_LAYER_NORMS = re.compile(r"(ln_1|ln_2|ln_f)\.weight$")


class NotGPT2(ValueError):
    """The model is not one `GPT2LMHeadModel` can represent; the message says why, in one line."""


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
        block_size=sd[_HF_WPE].shape[0],
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
        target = _OUR_WPE if key == _HF_WPE else key
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


def to_hf_gpt2(model: GPT, eot_token: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(GPT2Config keyword arguments, GPT2LMHeadModel state dict) with this model's weights.

    Raises NotGPT2 when a parameter has no GPT-2 counterpart (a learnable PE bias, Linformer's projections) or
    the model has no learned position table. A model trained with `model.bias=false` gets zero biases, which
    GPT-2 always has; the padded vocabulary (50304) is kept, so the logits are ours, row for row.
    """
    cfg = model.config
    ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    pe, attention = model.pe_config.name, model.attention_config.name
    if _OUR_WPE not in ours:
        raise NotGPT2(f"its PE ({pe}) has no learned position table, and GPT2LMHeadModel adds one to every input")
    foreign = sorted(k for k in ours if k != _OUR_WPE and not re.fullmatch(r"wte\.weight|ln_f\..*|h\.\d+\.(ln_1|ln_2|"
                                                                        r"attn\.c_attn|attn\.c_proj|mlp\.c_fc|"
                                                                        r"mlp\.c_proj)\.(weight|bias)", k))
    if foreign:
        raise NotGPT2(f"GPT-2 has no place for its {pe} PE / {attention} attention parameters ({foreign[0]}"
                      + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "") + ")")
    hf: dict[str, Tensor] = {}
    for key, value in ours.items():
        name = "transformer." + (_HF_WPE if key == _OUR_WPE else key)
        hf[name] = value.t().contiguous() if key.endswith(_CONV1D) else value
        if not cfg.bias and (_LAYER_NORMS.search(key) or key.endswith(("c_attn.weight", "c_proj.weight",
                                                                          "c_fc.weight"))):
            out_features = value.shape[0]
            hf[name.rsplit(".", 1)[0] + ".bias"] = torch.zeros(out_features)
    hf["lm_head.weight"] = hf["transformer.wte.weight"]
    config = dict(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=4 * cfg.n_embd, activation_function="gelu_new",  # GELU, tanh approximation
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
        bos_token_id=eot_token, eos_token_id=eot_token,
    )
    return config, hf
