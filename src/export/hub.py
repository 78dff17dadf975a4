"""Export a trained run as a Hugging Face Hub-ready folder: `python -m src.export RUN_DIR OUT_DIR`.

The folder holds what inference needs and nothing else (no optimizer state):
- `model.safetensors`, `model_config.json`: the newest checkpoint's weights and config (`load_model` reads
  the folder directly, so do `python -m src.chat --model OUT_DIR` and `python -m src.lm_eval`);
- `transformers/`: for a model that is GPT-2 (learned positions, exact attention), a standard GPT-2 folder that
  `GPT2LMHeadModel.from_pretrained` loads with no custom code (transformers_gpt2.py); for any other model the
  export says in one line why there is none;
- `summary.json`, `config.yaml`: the run's record, so the chat UI can show its PE, attention and metrics
  (and decode with its `data.tokenizer`);
- `README.md`: a model card with YAML front matter (library_name, license, tags, datasets) that the Hub
  indexes: the template `model_card.md` (the prose) filled with the model's names and table (computed here:
  training data, tokens seen, eval budgets, commit, the measured extrapolation; metric labels from
  src/metrics.py).
Upload it with `hf upload ORG/REPO OUT_DIR [NAME]`; then `python -m src.chat --model ORG/REPO[/NAME]`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import yaml

from src.atomic import atomic_write_json
from src.chat.store import LoadedModel, read_summary, read_tokenizer
from src.checkpoint import MODEL_CONFIG, WEIGHTS, find_checkpoint_dir, load_model
from src.data.config import DataConfig
from src.data.sources import source_for
from src.data.tokenizer import DEFAULT_TOKENIZER, describe_tokenizer
from src.metrics import (
    STEP,
    TOKENS,
    VAL_LOSS,
    extrapolation_multiplier,
    label_in,
)
from src.model import ATTENTION_REGISTRY, PE_REGISTRY
from src.structured import nested_get

_TEMPLATE = "model_card.md"  # next to this file: the card's prose, with $placeholders (string.Template)
TRANSFORMERS_DIR = "transformers"  # the subfolder GPT2LMHeadModel.from_pretrained(..., subfolder=...) reads
_DATA_DETAILS = ("hf_path", "hf_name", "hf_split", "hf_data_files", "path", "max_docs")  # shown unless default
HELLASWAG_ITEMS = 10_042  # the validation split's size (src/eval/hellaswag.py scores it, or its first `limit`)


class ExportError(RuntimeError):
    pass


@dataclass
class Exported:
    """What `export` wrote: the folder, and the transformers subfolder or the one line saying why there is none."""

    folder: Path
    transformers: Path | None
    no_transformers_reason: str | None


def _card_order(metric: str) -> tuple:
    """Validation loss first (the figure the grid is compared on), then the extrapolation losses by multiplier,
    then the rest by name."""
    multiplier = extrapolation_multiplier(metric)
    return metric != VAL_LOSS, multiplier is None, multiplier or 0, metric


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(f"| {key} | {value} |" for key, value in rows)


def training_data(config: dict[str, Any]) -> str | None:
    """The run's data source, described by its own class (src/data/sources.py), with the settings that pick it."""
    data = config.get("data") or {}
    if not data.get("name"):
        return None
    try:
        about = " ".join((source_for(data["name"]).__doc__ or "").split("\n\n")[0].split())
    except Exception:  # noqa: BLE001 - a source this checkout no longer has: its name still says what it was
        about = ""
    defaults = DataConfig()
    details = ", ".join(f"{key}={data[key]}" for key in _DATA_DETAILS
                        if data.get(key) is not None and data[key] != getattr(defaults, key))
    return f"`{data['name']}`" + (f" ({details})" if details else "") + (f": {about}" if about else "")


def eval_budgets(config: dict[str, Any]) -> str | None:
    """The fixed token and item budgets the table's figures were measured on (config.yaml's `eval`)."""
    val, extrapolation = nested_get(config, "eval.val.num_tokens"), nested_get(config, "eval.extrapolation")
    hellaswag = nested_get(config, "eval.hellaswag")
    parts = [f"val loss on {val:,} tokens"] if val else []
    if extrapolation and extrapolation.get("num_tokens"):
        multipliers = "/".join(str(m) for m in extrapolation.get("multipliers") or [])
        parts.append(f"extrapolation on {extrapolation['num_tokens']:,} tokens per context ({multipliers}×)")
    if hellaswag is not None and hellaswag.get("enabled", True):
        parts.append(f"HellaSwag on {hellaswag.get('limit') or HELLASWAG_ITEMS:,} items")
    return "; ".join(parts) or None


def card_rows(loaded: LoadedModel, config: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """The model card's table: what the model is, how it was trained and measured, and its final figures."""
    info, summary, config = loaded.info, loaded.summary, config or {}
    rows = [
        ("positional encoding", info["pe"]),
        ("attention", info["attention"]),
        ("parameters", f"{info['num_params']:,}"),
        ("layers / heads / width", f"{info['n_layer']} / {info['n_head']} / {info['n_embd']}"),
        ("context", loaded.context),
        ("tokenizer", loaded.tokenizer),
    ]
    if (data := training_data(config)) is not None:
        rows.append(("training data", data))
    for key, name in ((STEP, "training steps"), (TOKENS, "training tokens seen")):
        if summary.get(key) is not None:
            rows.append((name, f"{summary[key]:,}"))
    for key, name in (("seed", "seed"), ("git_commit", "commit")):
        if summary.get(key) is not None:
            rows.append((name, f"`{summary[key]}`" if key == "git_commit" else str(summary[key])))
    if (budgets := eval_budgets(config)) is not None:
        rows.append(("eval budgets", budgets))
    for key in sorted(loaded.metrics, key=_card_order):
        rows.append((label_in(key, summary), f"{loaded.metrics[key]:.4f}"))
    return rows


def _transformers_sections(name: str | None, reason: str | None) -> tuple[str, str]:
    """(the card's transformers usage, its Files line) for a model with a transformers folder, or without one."""
    if reason is not None:
        return "", f"- no `{TRANSFORMERS_DIR}/` folder: {reason}; load it with pegrid (above)"
    use = (
        "\nIt is also a standard GPT-2 (`transformers`, no custom code):\n\n```python\n"
        "from transformers import AutoTokenizer, GPT2LMHeadModel\n"
        f'model = GPT2LMHeadModel.from_pretrained("ORG/REPO", subfolder="{name}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("ORG/REPO", subfolder="{name}")\n```\n\n'
        "```bash\n"
        f"lm_eval --model hf --model_args pretrained=ORG/REPO,subfolder={name} --tasks hellaswag\n```\n")
    return use, (f"- `{name}/`: the same weights as a transformers GPT-2 (config.json, model.safetensors, "
                 "tokenizer); its logits equal pegrid's (max difference ≤ 1e-5, fp32, checked at export)")


def model_card(loaded: LoadedModel, license: str, config: dict[str, Any] | None = None,
               no_transformers_reason: str | None = "it was not exported") -> str:
    """README.md for the Hub: the template (model_card.md: front matter for search and filters, then what the model
    is and how to use it) filled with this model's names and table."""
    info, config = loaded.info, config or {}
    pe, attention = info["pe"], info["attention"]
    dataset = nested_get(config, "data.hf_path")
    use, files = _transformers_sections(TRANSFORMERS_DIR, no_transformers_reason)
    template = Template(resources.files("src.export").joinpath(_TEMPLATE).read_text(encoding="utf-8"))
    return template.substitute(
        library="pegrid" if no_transformers_reason else "transformers",
        license=license,
        datasets=f"datasets:\n- {dataset}\n" if dataset and dataset not in ("json", "text", "csv", "parquet") else "",
        pe=pe,
        attention=attention,
        name=loaded.summary.get("run_name") or f"{pe}-{attention}",
        grid=(f"{len(PE_REGISTRY.names())} positional encodings x {len(ATTENTION_REGISTRY.names())} "
              "attention mechanisms"),
        tokenizer=describe_tokenizer(loaded.tokenizer),
        table=_table(card_rows(loaded, config)),
        transformers_use=use,
        transformers_files=files,
        weights=WEIGHTS,
        model_config=MODEL_CONFIG,
    )


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ExportError(f"{path} is unreadable ({err}); restore it from the run or re-run training") from err


def export(run_dir: str | Path, out_dir: str | Path, license: str = "mit", transformers: bool = True) -> Exported:
    """Write the Hub-ready folder for the newest checkpoint of `run_dir` into `out_dir`, with its transformers
    subfolder where the model is GPT-2 (`transformers=False`: never)."""
    from src.export.transformers_gpt2 import NotGPT2, write_transformers_folder  # transformers loads in ~2 s

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a directory; pass a run dir written by `python -m src.train`")
    ckpt_dir = find_checkpoint_dir(run_dir)
    summary = read_summary(run_dir)
    if not summary:
        raise ExportError(f"{run_dir} has no readable summary.json; pass a run dir written by `python -m src.train`")
    config = _read_config(run_dir)
    model, _ = load_model(ckpt_dir)  # the weights must read back before they are published
    loaded = LoadedModel(str(run_dir), model, ckpt_dir, summary, tokenizer=read_tokenizer(run_dir) or DEFAULT_TOKENIZER)

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, MODEL_CONFIG):
        shutil.copyfile(ckpt_dir / name, out_dir / name)
    if (run_dir / "config.yaml").is_file():
        shutil.copyfile(run_dir / "config.yaml", out_dir / "config.yaml")
    atomic_write_json(out_dir / "summary.json", summary)
    hf_dir, reason = None, "--no-transformers was given"
    if transformers:
        try:
            hf_dir, reason = write_transformers_folder(model, loaded.tokenizer, out_dir / TRANSFORMERS_DIR), None
        except NotGPT2 as err:
            reason = f"transformers' GPT2LMHeadModel cannot hold this model: {err}"
            shutil.rmtree(out_dir / TRANSFORMERS_DIR, ignore_errors=True)  # a stale one from an earlier export
    (out_dir / "README.md").write_text(model_card(loaded, license, config, reason))
    return Exported(out_dir, hf_dir, reason)
