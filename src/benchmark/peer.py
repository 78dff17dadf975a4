"""The peer: Hugging Face `GPT2LMHeadModel` with `attn_implementation="sdpa"`, sized like our model.

Wrapped so that it is called exactly as our GPT is, `model(idx, targets) -> (logits, loss)`, with the same
loss (cross-entropy over every position, logits upcast to fp32). HF's own `labels=` path shifts the
labels and drops the last position, which would make the two models do different work.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from src.model.config import ModelConfig
from src.training.flops import training_flops_per_token

PEER_NAME = "hf-gpt2-sdpa"


class PeerGPT2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel  # dev dependency, imported only when benchmarking

        hf_cfg = GPT2Config(
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.n_embd,
            n_positions=cfg.block_size,
            vocab_size=cfg.vocab_size,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            bos_token_id=None,  # GPT-2's 50256 lies outside a small test vocabulary
            eos_token_id=None,
            attn_implementation="sdpa",
        )
        self.hf = GPT2LMHeadModel(hf_cfg)
        self.config = cfg

    def flops_per_token(self, context_len: int) -> float:
        """As src.training.flops, N without the position-embedding table."""
        n_params = sum(p.numel() for p in self.parameters()) - self.hf.transformer.wpe.weight.numel()
        return training_flops_per_token(n_params, self.config.n_layer, self.config.n_embd, context_len)

    def forward(self, idx: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.hf(input_ids=idx, use_cache=False).logits
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1))
