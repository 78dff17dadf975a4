"""Find, load and keep trained models for chatting, within a memory budget.

A model is named by a *spec* string:
- a local path: a run dir (its newest checkpoint), a checkpoint dir, or a folder made by `python -m src.export`;
- `ORG/REPO` or `ORG/REPO/NAME`: an export folder on the Hugging Face Hub (NAME: a subfolder of the repo),
  downloaded into the Hub cache (~/.cache/huggingface) by `huggingface_hub.snapshot_download`;
- `hf:ID` (e.g. `hf:gpt2`): a `transformers` GPT-2 from the Hub (or a local `save_pretrained` folder),
  converted by `from_hf_gpt2`.
A spec that exists locally, or does not have a Hub id's shape, is a local path (`local_path`, docs/CHAT.md).
Weights are always read from safetensors files, never unpickled.

`ModelStore` keeps at most `max_resident` models in memory (default 1, since a chat app on a laptop should
not pile up models as the user browses the grid): loading another first frees the least recently used.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from src.checkpoint import MODEL_CONFIG, WEIGHTS, CheckpointError, load_model, pe_variant
from src.data.tokenizer import DEFAULT_TOKENIZER, check_vocab_fits
from src.device import release_freed_memory
from src.errors import ConfigError
from src.metrics import (
    extrapolation_context_key,
    extrapolation_loss_key,
    extrapolation_multipliers,
    is_model_score,
    variant_pe_name,
)
from src.model import from_hf_gpt2
from src.model.gpt import GPT
from src.run_record import RunRecord, variant_record_dir

HF_PREFIX = "hf:"
# One name of a Hub id, by huggingface_hub's validate_repo_id rules: [\w.-], no leading/trailing . or -, no -- or ..
_HUB_NAME = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
# Folders pegrid itself writes models to: `outputs/x/y` is a mistyped run, never the Hub org "outputs".
PROJECT_DIRS = ("outputs", "exports")
# A last name ending like this is a file someone meant to load from disk (Hub names may hold dots: pythia-1.4b).
FILE_SUFFIXES = (".safetensors", ".json", ".yaml", ".yml", ".pt", ".pth", ".bin", ".ckpt", ".jsonl", ".txt")
NO_MODEL_HINT = ("expected a run dir (with checkpoints/step_*/), a checkpoint dir or an export folder "
                 f"({WEIGHTS} + {MODEL_CONFIG}) there")


class ModelLoadError(RuntimeError):
    """A model could not be found or read; the message is one line, fit to show a user."""


@dataclass
class LoadedModel:
    spec: str
    model: GPT
    source: Path  # the folder the weights were read from
    summary: dict[str, Any] = field(default_factory=dict)  # the run's summary.json, if it has one
    load_seconds: float = 0.0
    tokenizer: str = DEFAULT_TOKENIZER  # the name of the tokenizer its ids belong to (data.tokenizer)
    variant: str | None = None  # the PE variant its overrides make ("yarn×4", "base=500000"), None if plain

    @property
    def info(self) -> dict[str, Any]:
        """PE, attention and size of the model, for a model card or a UI."""
        cfg = self.model.config
        return {
            "pe": variant_pe_name(self.model.pe_config.name, self.variant),  # rope+yarn×4 with --pe overrides
            "attention": self.model.attention_config.name,
            "num_params": sum(p.numel() for p in self.model.parameters()),
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_embd": cfg.n_embd,
            "block_size": cfg.block_size,
            "max_context": self.model.max_context,
        }

    @property
    def context(self) -> str:
        """How long an input the model takes: fixed by its PE, or longer, qualified by the losses measured beyond
        the training context (never a bare "extrapolates"). For the chat, the page and the model card."""
        summary = self.summary
        if self.model.max_context is not None:
            return f"{self.model.max_context:,} tokens (fixed by the PE)"
        measured = [m for m in extrapolation_multipliers(summary) if summary[extrapolation_loss_key(m)] is not None]
        trained = f"trained on {self.model.config.block_size:,} tokens"
        if not measured:
            return f"{trained}; the PE takes longer inputs, how well it extrapolates was not measured"
        losses = ", ".join(f"{summary[extrapolation_loss_key(m)]:.3f} at {m}×"
                           + (f" ({tokens:,})" if (tokens := summary.get(extrapolation_context_key(m))) else "")
                           for m in measured)
        return f"{trained}; the PE takes longer inputs, measured loss {losses} (nats)"

    @property
    def metrics(self) -> dict[str, float]:
        """The run's final losses and scores from summary.json (none for a model without a run record); which keys
        those are is src/metrics.py's `is_model_score`."""
        return {k: v for k, v in sorted(self.summary.items()) if is_model_score(k) and v is not None}


def read_summary(folder: Path, variant: str | None = None) -> dict[str, Any]:
    """summary.json of a run dir or export folder, or of the run a checkpoint dir belongs to; {} if none
    (or unreadable). For a PE variant ("yarn×4"), its own record's (python -m src.eval +model.pe...), or the
    run's without its scores when the variant was not evaluated: the run's numbers are another model's."""
    for run_dir in (folder, folder.parent.parent):
        summary = RunRecord(run_dir).read_summary()
        if summary:
            if variant is None:
                return summary
            measured = RunRecord(variant_record_dir(run_dir, variant)).read_summary()
            return measured or {k: v for k, v in summary.items() if not is_model_score(k)}
    return {}


def read_tokenizer(folder: Path) -> str | None:
    """`data.tokenizer` of the run a run dir, checkpoint dir or export folder (which copies config.yaml) comes
    from; None without a config.yaml, and GPT-2 BPE when it predates the option."""
    for run_dir in (folder, folder.parent.parent):
        config_path = run_dir / "config.yaml"
        if config_path.is_file():
            try:
                config = yaml.safe_load(config_path.read_text()) or {}
            except yaml.YAMLError as err:
                raise ModelLoadError(f"{config_path} is unreadable, so its tokenizer is unknown ({err})") from err
            return (config.get("data") or {}).get("tokenizer", DEFAULT_TOKENIZER)
    return None


def discover_models(runs_dir: str | Path) -> list[str]:
    """Local model specs under `runs_dir`: run dirs with a checkpoint, and export folders, sorted (not an export's
    `transformers/` copy, whose weights sit without a model_config.json: the same model, in transformers' names)."""
    found = set()
    for weights in Path(runs_dir).glob(f"**/{WEIGHTS}"):
        folder = weights.parent
        if not (folder / MODEL_CONFIG).is_file():
            continue
        if folder.parent.name == "checkpoints":
            if not folder.name.startswith("step_"):
                continue  # a checkpoint being written (.tmp_step_*)
            folder = folder.parent.parent
        found.add(str(folder))
    return sorted(found)


def _hub_shaped(name: str, min_names: int, max_names: int) -> bool:
    names = name.split("/")
    return (min_names <= len(names) <= max_names and all(_HUB_NAME.fullmatch(n) for n in names)
            and not names[-1].lower().endswith(FILE_SUFFIXES)
            and names[0] not in PROJECT_DIRS and not Path(names[0]).exists())


def local_path(spec: str) -> Path | None:
    """The local folder `spec` names, or None when it names something on the Hub.

    A spec is a Hub id only if nothing exists at it locally and it has a Hub id's shape: ORG/REPO[/NAME]
    (`hf:` specs: [ORG/]REPO), each name one that the Hub allows, the last not ending in a file suffix, and
    the first not `outputs`, `exports` or anything else that exists in the current directory. So `./x`,
    `/x`, `~/x`, `outputs/grid/typo`, `a/b/c/d` and `org/repo/model.safetensors` are paths, never a
    network call.
    """
    hf = spec.startswith(HF_PREFIX)
    name = spec[len(HF_PREFIX):] if hf else spec
    path = Path(name).expanduser()
    if path.exists() or not _hub_shaped(name, *((1, 2) if hf else (2, 3))):
        return path
    return None


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


def _load_hub_export(spec: str, device: str, pe_overrides: dict | None = None) -> tuple[GPT, Path]:
    parts = spec.split("/")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    files = [f"{subfolder}/*"] if subfolder else None
    local = _download(repo_id, files, f"'{subfolder}/{WEIGHTS}'" if subfolder else f"'{WEIGHTS}'")
    return load_model(local / subfolder, device, pe_overrides)


def _load_transformers_gpt2(source: str | Path, device: str) -> tuple[GPT, Path]:
    """A Hub id (str), or a local folder written by `save_pretrained` (Path)."""
    if isinstance(source, Path):
        if not all((source / name).is_file() for name in ("config.json", WEIGHTS)):
            raise ModelLoadError(f"no model at {source}: expected a transformers save_pretrained folder "
                                 f"(config.json + {WEIGHTS}) there")
        local = source
    else:  # fetched by huggingface_hub first: offline it fails at once, where transformers retries for ~30 s
        local = _download(source, ["config.json", WEIGHTS], f"config.json and {WEIGHTS}")
    from transformers import GPT2LMHeadModel

    hf_model = GPT2LMHeadModel.from_pretrained(local, use_safetensors=True)
    model = from_hf_gpt2(hf_model)
    del hf_model
    return model.to(device).eval(), local


def load(spec: str, device: str = "cpu", pe_overrides: dict | None = None) -> LoadedModel:
    """Load the model named by `spec` (see the module docstring); `pe_overrides` change its PE config for
    inference (e.g. {"scaling": {"type": "yarn", "factor": 4}}: src.checkpoint.load_model)."""
    start = time.perf_counter()
    try:
        path = local_path(spec)
        if spec.startswith(HF_PREFIX):
            if pe_overrides:
                raise ModelLoadError(f"{spec} is a transformers GPT-2 (learned positions): PE overrides apply to "
                                     f"pegrid models only")
            model, source = _load_transformers_gpt2(path or spec[len(HF_PREFIX):], device)
        elif path is None:
            model, source = _load_hub_export(spec, device, pe_overrides)
        elif path.exists():
            model, source = load_model(path, device, pe_overrides)
        else:
            raise ModelLoadError(f"no model at {spec}: {NO_MODEL_HINT}")
    except (CheckpointError, ConfigError) as err:  # ConfigError: a PE override the checkpoint's PE does not take
        raise ModelLoadError(str(err)) from err
    if spec.startswith(HF_PREFIX):
        summary, recorded, variant = {}, None, None
    else:
        variant = pe_variant(model, source, pe_overrides or {})
        summary, recorded = read_summary(source, variant), read_tokenizer(source)
    if recorded is not None:  # a model without its run's config is taken to speak GPT-2, as hf: models do
        try:
            check_vocab_fits(model.config.vocab_size, recorded)
        except ValueError as err:
            raise ModelLoadError(f"{source}: {err}") from err
    return LoadedModel(spec, model, source, summary, time.perf_counter() - start, recorded or DEFAULT_TOKENIZER,
                       variant)


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

    def get(self, spec: str, pe_overrides: dict | None = None) -> LoadedModel:
        """The model of `spec` (with `pe_overrides`, see `load`: a model of its own in the store)."""
        key = f"{spec} {json.dumps(pe_overrides, sort_keys=True)}" if pe_overrides else spec
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            # Free before loading, so that memory never holds more than max_resident models.
            while len(self._models) >= self.max_resident:
                self._models.popitem(last=False)
                release_freed_memory()
            loaded = load(spec, self.device, pe_overrides)
            release_freed_memory()  # the state dict read from disk
            self._models[key] = loaded
            return loaded


def parse_pe_overrides(items: list[str]) -> dict:
    """KEY=VALUE items (`scaling.type=yarn`, `scaling.factor=4`) as the nested dict `load` takes, values parsed as
    YAML (4 -> 4, yarn -> "yarn"); a malformed item is a ModelLoadError naming it."""
    bad = [item for item in items if "=" not in item or not item.split("=", 1)[0].strip()]
    if bad:
        raise ModelLoadError(f"a PE setting is KEY=VALUE (e.g. scaling.type=yarn), got {bad[0]!r}")
    return OmegaConf.to_container(OmegaConf.from_dotlist(items)) if items else {}
