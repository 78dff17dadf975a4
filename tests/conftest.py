import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")

PES = ["learned", "sinusoidal", "rope", "alibi", "kerple", "fire", "nope"]
ATTENTIONS = ["regular", "flash", "linformer"]


def tiny_model_cfg(pe_name: str, attention_name: str, **overrides) -> dict:
    """A 2-layer model small enough for exhaustive CPU tests; Linformer chunks of 8 compressed to 2 slots."""
    attention_cfg = {"name": attention_name}
    if attention_name == "linformer":
        attention_cfg.update(chunk_size=8, k=2)
    cfg = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=97, dropout=0.0, bias=True,
               pe={"name": pe_name}, attention=attention_cfg)
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
