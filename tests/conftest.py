import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")


def __getattr__(name: str):
    """PES and ATTENTIONS (what every parametrised test covers) and EXTRAPOLATING_PES, from the model
    registries: a new PE or attention is tested with no change here. Looked up on first use, because
    importing src.model costs seconds that test modules which do not need them should not pay."""
    if name not in ("PES", "ATTENTIONS", "EXTRAPOLATING_PES"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from src.model import ATTENTION_REGISTRY, PE_REGISTRY
    from src.model.pe.base import extrapolating_pes

    values = dict(PES=PE_REGISTRY.names(), ATTENTIONS=ATTENTION_REGISTRY.names(),
                  EXTRAPOLATING_PES=extrapolating_pes())
    globals().update(values)
    return values[name]


def sized_components(pe_name: str, attention_name: str, block_size: int) -> dict:
    """`pe` and `attention` config nodes sized for a `block_size`-token context by each component's
    `for_context` hook (e.g. Linformer's chunks), the same hook the benchmark uses."""
    from src.model import ATTENTION_REGISTRY, PE_REGISTRY

    return dict(pe=PE_REGISTRY.for_context(pe_name, block_size),
                attention=ATTENTION_REGISTRY.for_context(attention_name, block_size))


def sized_overrides(pe_name: str, attention_name: str, block_size: int) -> list[str]:
    """`sized_components` as Hydra overrides of the composed `model.pe` / `model.attention` nodes."""
    def value(v) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)

    return [f"model.{group}.{key}={value(v)}"
            for group, node in sized_components(pe_name, attention_name, block_size).items()
            for key, v in node.items() if key != "name"]


def tiny_model_cfg(pe_name: str, attention_name: str, **overrides) -> dict:
    """A 2-layer model small enough for exhaustive CPU tests, each component sized for its 32-token context
    (Linformer: chunks of 8 compressed to 2 slots). `overrides` replace any key, `pe` / `attention` included."""
    block_size = 32
    cfg = dict(n_layer=2, n_head=4, n_embd=32, block_size=block_size, vocab_size=97, dropout=0.0, bias=True,
               **sized_components(pe_name, attention_name, block_size))
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run ~100x slower when torch's threads fight other processes for 2 shared cores; a module
    uses it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def root() -> Path:
    return ROOT
