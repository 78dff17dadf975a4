"""GPT-2 (Radford et al. 2019) in the spirit of nanoGPT's model.py, with a pluggable PE and attention.

Pre-LN blocks, GELU (tanh approximation, as GPT-2) MLP, tied input/output embeddings, GPT-2 init:
N(0, 0.02) weights, zero biases, and residual projections scaled by 1/√(2·n_layer) (GPT-2 §2.3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.model.attention import ATTENTION_REGISTRY, AttentionMechanism
from src.model.config import ModelConfig
from src.model.kv_cache import KVCache
from src.model.pe import PE_REGISTRY, PositionalEncoding


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, mechanism: AttentionMechanism,
                 own_pe: PositionalEncoding | None):
        super().__init__()
        self.layer, self.n_head = layer, cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_projection = True
        self.mechanism = mechanism
        self.pe = own_pe  # per-layer PE parameters (KERPLE, FIRE); None: the model's shared PE is used
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, pos: Tensor, shared_pe: PositionalEncoding | None,
                kv_cache: KVCache | None) -> Tensor:
        pe = self.pe if self.pe is not None else shared_pe
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        q, k = pe.rotate(q, pos), pe.rotate(k, pos)
        k_pos = pos
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)
            k_pos = torch.arange(k.size(-2), device=x.device)
        y = self.mechanism(q, k, v, pos, k_pos, pe)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, mechanism: AttentionMechanism,
                 own_pe: PositionalEncoding | None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer, mechanism, own_pe)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, pos: Tensor, shared_pe: PositionalEncoding | None,
                kv_cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), pos, shared_pe, kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        pe_cfg, pe_cls = PE_REGISTRY.resolve(cfg.pe)
        attn_cfg, attn_cls = ATTENTION_REGISTRY.resolve(cfg.attention)
        self.pe_config, self.attention_config = pe_cfg, attn_cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        # A per-layer PE (learnable biases) lives in each attention layer; others are one shared module.
        self.pe = None if pe_cls.per_layer else pe_cls(pe_cfg, cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(
            Block(cfg, layer, attn_cls(attn_cfg, cfg), pe_cls(pe_cfg, cfg) if pe_cls.per_layer else None)
            for layer in range(cfg.n_layer)
        )
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (GPT-2, Press & Wolf 2017)
        self._init_gpt2_weights()
        self._position_encodings = [m for m in self.modules() if isinstance(m, PositionalEncoding)]

    def _init_gpt2_weights(self) -> None:
        # PEs and attention mechanisms initialise their own parameters as their papers do.
        own_init = {id(m) for m in self.modules() if isinstance(m, (PositionalEncoding, AttentionMechanism))}
        skip = {id(sub) for m in self.modules() if id(m) in own_init for sub in m.modules()}
        for module in self.modules():
            if id(module) in skip:
                continue
            if isinstance(module, nn.Linear):
                residual = getattr(module, "residual_projection", False)
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if residual else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def max_context(self) -> int | None:
        """Longest sequence the PE can represent; None when it extrapolates to any length."""
        limits = [pe.max_positions for pe in self._position_encodings if pe.max_positions]
        return min(limits) if limits else None

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n

    def attention_layers(self) -> list[tuple[AttentionMechanism, PositionalEncoding]]:
        """Each layer's attention mechanism and the PE it attends with (its own, or the shared one)."""
        return [(block.attn.mechanism, block.attn.pe if block.attn.pe is not None else self.pe) for block in self.h]

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.config.n_layer)

    def forward(self, idx: Tensor, targets: Tensor | None = None, kv_cache: KVCache | None = None):
        """idx [B, T] token ids -> logits [B, T, vocab]; with targets [B, T] -> (logits, mean CE loss).

        With a `kv_cache` the tokens continue the cached sequence (positions from `kv_cache.length` on) and
        their keys/values are appended; the logits equal those of one forward pass over the whole sequence.
        """
        start = kv_cache.length if kv_cache is not None else 0
        for pe in self._position_encodings:
            pe.prepare(start + idx.size(1))
        pos = torch.arange(start, start + idx.size(1), device=idx.device)
        x = self.wte(idx)
        if self.pe is not None:
            x = self.pe.embed(x, pos)
        x = self.drop(x)
        for block in self.h:
            x = block(x, pos, self.pe, kv_cache)
        if kv_cache is not None:
            kv_cache.length += idx.size(1)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss
