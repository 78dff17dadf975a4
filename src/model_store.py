"""Find, load and keep trained models for chatting, within a memory budget.

A model is named by a *spec* string:
- a local path: a run dir (its newest checkpoint), a checkpoint dir, or a folder made by `python -m src.export`;
- `ORG/REPO` or `ORG/REPO/NAME`: an export folder on the Hugging Face Hub (NAME: a subfolder of the repo),
  downloaded into the Hub cache (~/.cache/huggingface) by `huggingface_hub.snapshot_download`;
- `hf:ID` (e.g. `hf:gpt2`): a `transformers` GPT-2 from the Hub (or a local `save_pretrained` folder),
  converted by `from_hf_gpt2`.
Weights are always read from safetensors files, never unpickled.

`ModelStore` keeps at most `max_resident` models in memory (default 1, since a chat app on a laptop should
not pile up models as the user browses the grid): loading another first frees the least recently used.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.checkpoint import WEIGHTS, CheckpointError, load_model
from src.model import from_hf_gpt2
from src.model.gpt import GPT
from src.training.run_record import RunRecord

HF_PREFIX = "hf:"
# summary.json keys worth showing next to a model (see README "Run record")
_METRIC_PREFIXES = ("val/", "train/loss", "extrapolation/loss_", "hellaswag/acc")


def release_freed_memory() -> None:
    """Collect garbage, then have glibc return freed heap pages to the OS.

    Without the trim, glibc keeps the ~2 models' worth of memory a load peaks at (the model plus the
    state dict read from disk) and RSS settles at ~2.5 models with one resident (measured, docs/CHAT.md).
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the allocator keeps its own policy
        pass


class ModelLoadError(RuntimeError):
    """A model could not be found or read; the message is one line, fit to show a user."""


@dataclass
class LoadedModel:
    spec: str
    model: GPT
    source: Path  # the folder the weights were read from
    summary: dict[str, Any] = field(default_factory=dict)  # the run's summary.json, if it has one
    load_seconds: float = 0.0

    @property
    def info(self) -> dict[str, Any]:
        """PE, attention and size of the model, for a model card or a UI."""
        cfg = self.model.config
        return {
            "pe": self.model.pe_config.name,
            "attention": self.model.attention_config.name,
            "num_params": sum(p.numel() for p in self.model.parameters()),
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_embd": cfg.n_embd,
            "block_size": cfg.block_size,
            "max_context": self.model.max_context,
        }

    @property
    def metrics(self) -> dict[str, float]:
        """The run's final losses and scores from summary.json (none for a model without a run record)."""
        return {k: v for k, v in sorted(self.summary.items()) if k.startswith(_METRIC_PREFIXES) and v is not None}


def read_summary(folder: Path) -> dict[str, Any]:
    """summary.json of a run dir or export folder, or of the run a checkpoint dir belongs to; {} if none
    (or unreadable)."""
    for run_dir in (folder, folder.parent.parent):
        summary = RunRecord(run_dir).read_summary()
        if summary:
            return summary
    return {}


def discover_models(runs_dir: str | Path) -> list[str]:
    """Local model specs under `runs_dir`: run dirs with a checkpoint, and export folders, sorted."""
    found = set()
    for weights in Path(runs_dir).glob(f"**/{WEIGHTS}"):
        folder = weights.parent
        if folder.parent.name == "checkpoints":
            if not folder.name.startswith("step_"):
                continue  # a checkpoint being written (.tmp_step_*)
            folder = folder.parent.parent
        found.add(str(folder))
    return sorted(found)


def _download(repo_id: str, allow_patterns: list[str] | None, what: str) -> Path:
    """snapshot_download with its many failure types (offline, no such repo, gated) as one ModelLoadError."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except Exception as err:  # noqa: BLE001 - network, HTTP, validation and cache errors alike end here
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"could not get {what} from the Hugging Face Hub repo '{repo_id}' ({type(err).__name__}: {reason}); "
            "check the name and the network, or pass a local run dir / export folder"
        ) from err


def _load_hub_export(spec: str, device: str) -> tuple[GPT, Path]:
    parts = spec.strip("/").split("/")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    files = [f"{subfolder}/*"] if subfolder else None
    local = _download(repo_id, files, f"'{subfolder}/{WEIGHTS}'" if subfolder else f"'{WEIGHTS}'")
    return load_model(local / subfolder, device)


def _load_transformers_gpt2(model_id: str, device: str) -> tuple[GPT, Path]:
    """A Hub id, or a folder written by `save_pretrained`."""
    if Path(model_id).is_dir():
        local = Path(model_id)
    else:  # fetched by huggingface_hub first: offline it fails at once, where transformers retries for ~30 s
        local = _download(model_id, ["config.json", "model.safetensors"], "config.json and model.safetensors")
    from transformers import GPT2LMHeadModel

    hf_model = GPT2LMHeadModel.from_pretrained(local, use_safetensors=True)
    model = from_hf_gpt2(hf_model)
    del hf_model
    return model.to(device).eval(), local


def load(spec: str, device: str = "cpu") -> LoadedModel:
    """Load the model named by `spec` (see the module docstring)."""
    start = time.perf_counter()
    try:
        if spec.startswith(HF_PREFIX):
            model, source = _load_transformers_gpt2(spec[len(HF_PREFIX):], device)
        elif Path(spec).exists():
            model, source = load_model(spec, device)
        elif spec.count("/") >= 1 and not spec.startswith((".", "/")):
            model, source = _load_hub_export(spec, device)
        else:
            raise ModelLoadError(f"no model at '{spec}': not a local path, an ORG/REPO[/NAME] Hub id or hf:ID")
    except CheckpointError as err:
        raise ModelLoadError(str(err)) from err
    summary = {} if spec.startswith(HF_PREFIX) else read_summary(source)
    return LoadedModel(spec, model, source, summary, time.perf_counter() - start)


class ModelStore:
    """At most `max_resident` loaded models; getting another frees the least recently used one first.

    The model is freed for real only when nothing else references it: callers should hold a `LoadedModel`
    for one request (one Streamlit script run), not keep it.
    """

    def __init__(self, max_resident: int = 1, device: str = "cpu"):
        if max_resident < 1:
            raise ValueError(f"max_resident must be at least 1, got {max_resident}")
        self.max_resident = max_resident
        self.device = device
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()  # Streamlit serves each browser session from its own thread

    @property
    def resident(self) -> list[str]:
        """Specs of the models in memory, least recently used first."""
        return list(self._models)

    def get(self, spec: str) -> LoadedModel:
        with self._lock:
            if spec in self._models:
                self._models.move_to_end(spec)
                return self._models[spec]
            # Free before loading, so that memory never holds more than max_resident models.
            while len(self._models) >= self.max_resident:
                self._models.popitem(last=False)
                release_freed_memory()
            loaded = load(spec, self.device)
            release_freed_memory()  # the state dict read from disk
            self._models[spec] = loaded
            return loaded
