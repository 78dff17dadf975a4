"""Causal Linformer: exact attention inside the current chunk, compressed keys/values for past chunks.

Linformer (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity", §4, eq. 7) projects the
n keys and values along the sequence with E, F ∈ R^{k×n}. Every compressed slot mixes all positions,
so used as-is in a causal LM each token sees the future, and the LM reports a falsely low loss.

Causal variant used here: split the sequence into chunks of `chunk_size` = c positions. Each completed
chunk is compressed to `k` slots (K̃ = E·K_chunk, Ṽ = F·V_chunk, E, F ∈ R^{k×c} learned, shared by all chunks
and heads — the paper's headwise sharing). A query in chunk m attends to
  - the k slots of every earlier chunk 0..m−1 (all strictly in its past), and
  - the keys of its own chunk up to and including its own position, exactly (causal mask).
No slot depends on a future token, so the model is causal by construction.

Positions of slots: a slot stands for its chunk's centre (start + (c − 1)/2); a bias PE (ALiBi, KERPLE,
FIRE) is evaluated at that representative position. Keys are rotated (RoPE) at their true positions
before compression.

When training on CUDA the same rule runs as one FlexAttention call over [all slots; all keys]:
the block mask (built once, shared by the layers and steps) skips the future slots and every key outside the
query's chunk, so the kernel computes about T·(k·T/(2c) + c) scores, fused, instead of T²/2 (flash). Where
FlexAttention is unavailable (see `flex.py`) the explicit path below serves. Training backends
(`attention_backend`): "flex", "linformer-dense".

With a KV cache (decoding), the queries are the last positions of the cached keys, and the same rule is
applied by masks over all slots and all cached keys (`_attend_to_cache`): O(T_new · T) per step.

Cost per layer, T = sequence length: scores T·(k·T/c + c) instead of T², i.e. O(T²·k/c + T·c) time and
memory; for a fixed ratio k/c that is a constant-factor saving (c/k), and with c ≈ √(T·k) it is
O(T^1.5·k^0.5).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.model.attention.base import ATTENTION_REGISTRY, AttentionConfig, AttentionMechanism, causal_mask
from src.model.attention.flex import flex_applies, flex_attention_with_bias, flex_or_none, flex_trains


@dataclass
class LinformerConfig(AttentionConfig):
    chunk_size: int = 128  # c: positions attended exactly; completed chunks are compressed together
    k: int = 32  # slots each completed chunk is compressed to (must be < chunk_size)
    use_flex: bool = True  # one fused FlexAttention call when training on CUDA (block mask skips hidden slots and keys)

    @classmethod
    def for_context(cls, block_size: int) -> dict:
        """At least 4 chunks per training window (else compression is barely trained: one chunk is exact
        attention), at most 128 positions each, compressed 4:1. 32 -> 8/2, 64 -> 16/4 (linformer_short.yaml),
        256 -> 64/16, from 512 on 128/32 (linformer.yaml)."""
        chunk_size = max(2, min(128, block_size // 4))
        return {"chunk_size": chunk_size, "k": max(1, chunk_size // 4)}


@ATTENTION_REGISTRY.register("linformer", LinformerConfig)
class LinformerAttention(AttentionMechanism):
    def __init__(self, cfg: LinformerConfig, model_cfg) -> None:
        super().__init__(cfg, model_cfg)
        if not 0 < cfg.k < cfg.chunk_size:
            raise ValueError(
                f"model.attention.k ({cfg.k}) must be positive and smaller than model.attention.chunk_size "
                f"({cfg.chunk_size}), otherwise compression saves nothing"
            )
        # Like the paper's nn.Linear(n, k) projections; std 1/√c keeps a slot at the scale of one key.
        self.key_proj = nn.Parameter(torch.randn(cfg.k, cfg.chunk_size) / math.sqrt(cfg.chunk_size))
        self.value_proj = nn.Parameter(torch.randn(cfg.k, cfg.chunk_size) / math.sqrt(cfg.chunk_size))

    def _slots(self, k: Tensor, v: Tensor, first_pos: Tensor) -> tuple[Tensor, ...]:
        """Chunked keys/values [B, H, n, c, D] (last chunk zero-padded), their compressed slots
        [B, H, n·k, D], each slot's representative position and chunk index."""
        B, H, T, D = k.shape
        c, s = self.cfg.chunk_size, self.cfg.k
        n = -(-T // c)  # padded keys lie after every real query, so the mask hides them
        kc, vc = (F.pad(x, (0, 0, 0, n * c - T)).view(B, H, n, c, D) for x in (k, v))
        k_slots = torch.einsum("sc,bhncd->bhnsd", self.key_proj, kc).reshape(B, H, n * s, D)
        v_slots = torch.einsum("sc,bhncd->bhnsd", self.value_proj, vc).reshape(B, H, n * s, D)
        chunk = torch.arange(n, device=k.device).repeat_interleave(s)
        slot_pos = first_pos + chunk * c + (c - 1) / 2
        return kc, vc, k_slots, v_slots, slot_pos, chunk

    def training_backend(self, pe, device: torch.device, dtype: torch.dtype) -> str:
        return "flex" if flex_trains(self.cfg.use_flex, device, dtype, self.dropout) else "linformer-dense"

    def forward(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, pe) -> Tensor:
        if q.size(-2) != k.size(-2):
            return self._attend_to_cache(q, k, v, q_pos, k_pos, pe)
        if flex_applies(self.cfg.use_flex, q, self.dropout if self.training else 0.0):
            out = flex_or_none(lambda: self._flex_forward(q, k, v, q_pos, k_pos, pe), q)
            if out is not None:  # None: FlexAttention failed just now; the explicit path below redoes the call
                return out
        B, H, T, D = q.shape
        c, s = self.cfg.chunk_size, self.cfg.k
        kc, vc, k_slots, v_slots, slot_pos, slot_chunk = self._slots(k, v, k_pos[0])
        n = kc.size(2)
        qc = F.pad(q, (0, 0, 0, n * c - T)).view(B, H, n, c, D)
        pos = (q_pos[0] + torch.arange(n * c, device=q.device)).view(n, c)

        scale = 1.0 / math.sqrt(D)
        slot_scores = (qc.reshape(B, H, n * c, D) @ k_slots.transpose(-2, -1)).view(B, H, n, c, n * s) * scale
        local_scores = (qc @ kc.transpose(-2, -1)) * scale  # [B, H, n, c, c]
        if pe.has_bias:
            slot_scores = slot_scores + pe.bias_matrix(pos.view(n * c), slot_pos).view(H, n, c, n * s).to(q.dtype)
            local_scores = local_scores + pe.bias_matrix(pos, pos).to(q.dtype)
        # Slots of chunk j are visible to queries of chunk m iff j < m.
        slot_visible = (slot_chunk[None, :] < torch.arange(n, device=q.device)[:, None])[:, None, :]
        slot_scores = slot_scores.masked_fill(~slot_visible, float("-inf"))
        local_scores = local_scores.masked_fill(~causal_mask(pos, pos), float("-inf"))

        probs = torch.cat((slot_scores, local_scores), dim=-1).softmax(dim=-1)
        probs = F.dropout(probs, p=self.dropout, training=self.training)
        slot_probs, local_probs = probs.split((n * s, c), dim=-1)
        out = slot_probs.reshape(B, H, n * c, n * s) @ v_slots + (local_probs @ vc).view(B, H, n * c, D)
        return out[:, :, :T]

    def _flex_forward(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, pe,
                      compiled: bool = True) -> Tensor:
        """`forward`'s rule as one fused call: keys = [slots of every chunk; the T keys]."""
        c = self.cfg.chunk_size
        _, _, k_slots, v_slots, slot_pos, slot_chunk = self._slots(k, v, k_pos[0])
        n_slots = slot_chunk.numel()
        key_chunk = torch.cat((slot_chunk, torch.arange(k.size(-2), device=k.device) // c))

        def visible(q_idx, kv_idx):
            q_chunk = q_idx // c
            earlier_chunk_slot = (kv_idx < n_slots) & (key_chunk[kv_idx] < q_chunk)
            own_chunk_key = (kv_idx >= n_slots) & (key_chunk[kv_idx] == q_chunk) & (kv_idx - n_slots <= q_idx)
            return earlier_chunk_slot | own_chunk_key

        key_pos = torch.cat((slot_pos, k_pos.to(slot_pos.dtype)))
        # The rule depends on c, k and the length alone (q_pos = k_pos here): one block mask per length.
        return flex_attention_with_bias(q, torch.cat((k_slots, k), dim=2), torch.cat((v_slots, v), dim=2),
                                        q_pos, key_pos, pe, visible, compiled,
                                        mask_key=("linformer", c, self.cfg.k))

    def _attend_to_cache(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, pe) -> Tensor:
        """Queries at the last positions of the cached keys (k_pos = 0..T−1): the same visibility rule."""
        probs, _, v_slots = self._probs_over_slots_and_keys(q, k, v, q_pos, k_pos, pe)
        slot_probs, local_probs = probs.split((v_slots.size(-2), k.size(-2)), dim=-1)
        return slot_probs @ v_slots + local_probs @ v

    def attention_weights(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, pe
                          ) -> tuple[Tensor, Tensor]:
        """Probabilities over [every chunk's slots; every key], at [slot positions; key positions]."""
        probs, key_pos, _ = self._probs_over_slots_and_keys(q.float(), k.float(), v.float(), q_pos, k_pos, pe)
        return probs, key_pos

    def _probs_over_slots_and_keys(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, pe
                                   ) -> tuple[Tensor, Tensor, Tensor]:
        """The rule of `forward` with masks over all slots and all keys (k_pos = 0..T−1, queries among them):
        probabilities [B, H, Tq, n·k + T], the positions of those slots and keys, and the slots' values."""
        c = self.cfg.chunk_size
        _, _, k_slots, v_slots, slot_pos, slot_chunk = self._slots(k, v, k_pos[0])
        scale = 1.0 / math.sqrt(q.size(-1))
        slot_scores = (q @ k_slots.transpose(-2, -1)) * scale  # [B, H, Tq, n·k]
        local_scores = (q @ k.transpose(-2, -1)) * scale  # [B, H, Tq, T]
        if pe.has_bias:
            slot_scores = slot_scores + pe.bias_matrix(q_pos, slot_pos).to(q.dtype)
            local_scores = local_scores + pe.bias_matrix(q_pos, k_pos).to(q.dtype)
        q_chunk = ((q_pos - k_pos[0]) // c)[:, None]
        slot_scores = slot_scores.masked_fill(~(slot_chunk[None, :] < q_chunk), float("-inf"))
        same_chunk = ((k_pos - k_pos[0]) // c)[None, :] == q_chunk
        local_scores = local_scores.masked_fill(~(same_chunk & causal_mask(q_pos, k_pos)), float("-inf"))
        probs = torch.cat((slot_scores, local_scores), dim=-1).softmax(dim=-1)
        return probs, torch.cat((slot_pos.float(), k_pos.float())), v_slots
