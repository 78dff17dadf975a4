"""The one interface every positional encoding implements.

A PE can act at three places, and most use only one:
- `embed(x, pos)`: transform the token embeddings x [B, T, C], usually by adding to them (learned, sinusoidal);
- `rotate(x, pos)`: transform queries and keys before the dot product (RoPE);
- `bias(h, q_pos, k_pos)`: an additive attention-score bias (ALiBi, KERPLE), or `bias_matrix` for a bias
  with no cheap closed form (FIRE).

Positions are absolute token indices (float for `bias`, so a compressed Linformer slot can sit at a
fractional representative position). `bias` works elementwise on broadcastable tensors, which lets the same
definition serve as a FlexAttention `score_mod` (`score_mod_bias`) and, through `bias_matrix`, as a dense bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from src.model.config import ModelConfig
from src.model.registry import ComponentConfig, Registry


@dataclass
class PEConfig(ComponentConfig):
    pass


PE_REGISTRY: Registry[PositionalEncoding] = Registry("positional encoding", "model/pe", "src.model.pe")


class PositionalEncoding(nn.Module):
    has_bias: bool = False  # True when `bias` is implemented
    per_layer: bool = False  # True: every attention layer owns an instance (learnable per-layer biases)
    max_positions: int | None = None  # None: extrapolates to any length

    def __init__(self, cfg: PEConfig, model_cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_head = model_cfg.n_head

    def prepare(self, seq_end: int) -> None:
        """Called before each forward pass with the end position (a Python int, so no GPU sync or compile
        graph break): check the length, grow tables."""
        self.check_length(seq_end)

    def embed(self, x: Tensor, pos: Tensor) -> Tensor:
        return x

    def rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        """x: [B, H, T, D]; pos: [T]."""
        return x

    def bias(self, h: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} adds no attention bias")

    def bias_matrix(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Dense bias [H, ..., Tq, Tk] for q_pos [..., Tq] and k_pos [..., Tk] (same leading dims)."""
        h = torch.arange(self.n_head, device=q_pos.device).view(-1, *([1] * q_pos.dim()), 1)
        return self.bias(h, q_pos.float()[None, ..., :, None], k_pos.float()[None, ..., None, :])

    def score_mod_bias(self, q_pos: Tensor, k_pos: Tensor):
        """The bias as a function of (head, query index, key index) for FlexAttention's `score_mod`; it must be
        elementwise (no reductions). Default: the closed form, so no [H, Tq, Tk] bias is materialised."""
        return lambda h, q_idx, kv_idx: self.bias(h, q_pos[q_idx].float(), k_pos[kv_idx].float())

    # Config keys whose value `variant_name` names (RoPE: "scaling"). Overrides of other keys name themselves
    # ("base=500000"); overrides of these that `variant_name` calls plain (factor 1) are no variant at all.
    variant_keys: tuple[str, ...] = ()

    def variant_name(self) -> str | None:
        """A short name of this PE's inference-time setting when it is not the plain one the PE trains with
        (RoPE's `scaling`: "yarn×4"), None when it is plain. A checkpoint evaluated with such a setting is
        recorded as a variant of its run (`python -m src.eval`), shown as `<pe>+<variant>` (src/metrics.py)."""
        return None

    def check_length(self, seq_end: int) -> None:
        if self.max_positions is not None and seq_end > self.max_positions:
            raise ValueError(
                f"the '{self.cfg.name}' positional encoding covers {self.max_positions} positions but the "
                f"input reaches position {seq_end}; shorten the input or use a PE that extrapolates "
                f"({', '.join(extrapolating_pes())})"
            )


def extrapolating_pes() -> list[str]:
    """The registered PEs with no position limit: those whose module, built with its schema's defaults for a
    small model, has `max_positions` None (a PE may set its limit in `__init__`, from the model's block_size,
    as learned does, so the class attribute alone does not tell)."""
    probe = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=16)
    names = []
    with torch.random.fork_rng(devices=[]):  # building a PE may draw its initial weights: leave the seed be
        for name in PE_REGISTRY.names():
            config_cls, module_cls = PE_REGISTRY.entry(name)
            if module_cls(config_cls(name=name), probe).max_positions is None:
                names.append(name)
    return names
