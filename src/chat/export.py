"""Export a trained run as a Hugging Face Hub-ready folder: `python -m src.chat.export RUN_DIR OUT_DIR`.

The folder holds what inference needs and nothing else (no optimizer state):
- `model.safetensors`, `model_config.json`: the newest checkpoint's weights and config (`load_model` reads
  the folder directly, so does `python -m src.chat --model OUT_DIR`);
- `summary.json`, `config.yaml`: the run's record, so the chat UI can show its PE, attention and metrics
  (and decode with its `data.tokenizer`);
- `README.md`: a model card with YAML front matter (library_name, license, tags) that the Hub indexes: the
  template `model_card.md` (the prose) filled with the model's names and table (computed here; metric labels from
  src/metrics.py).
Upload it with `hf upload ORG/REPO OUT_DIR [NAME]`; then `python -m src.chat --model ORG/REPO[/NAME]`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path
from string import Template

from src.atomic import atomic_write_json
from src.chat.store import LoadedModel, read_summary, read_tokenizer
from src.checkpoint import MODEL_CONFIG, WEIGHTS, CheckpointError, find_checkpoint_dir, load_model
from src.data.tokenizer import DEFAULT_TOKENIZER, describe_tokenizer
from src.metrics import STEP, TOKENS, VAL_LOSS, extrapolation_context_key, extrapolation_multiplier, label
from src.model import ATTENTION_REGISTRY, PE_REGISTRY

_TEMPLATE = "model_card.md"  # next to this file: the card's prose, with $placeholders (string.Template)


class ExportError(RuntimeError):
    pass


def _card_order(metric: str) -> tuple:
    """Validation loss first (the figure the grid is compared on), then the extrapolation losses by multiplier,
    then the rest by name."""
    multiplier = extrapolation_multiplier(metric)
    return metric != VAL_LOSS, multiplier is None, multiplier or 0, metric


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(f"| {key} | {value} |" for key, value in rows)


def card_rows(loaded: LoadedModel) -> list[tuple[str, str]]:
    """The model card's table: what the model is, how it was trained, and its final figures."""
    info, summary = loaded.info, loaded.summary
    context = (f"{info['max_context']} tokens (fixed by the PE)" if info["max_context"] is not None
               else f"trained on {info['block_size']}, extrapolates to longer inputs")
    rows = [
        ("positional encoding", info["pe"]),
        ("attention", info["attention"]),
        ("parameters", f"{info['num_params']:,}"),
        ("layers / heads / width", f"{info['n_layer']} / {info['n_head']} / {info['n_embd']}"),
        ("context", context),
        ("tokenizer", loaded.tokenizer),
    ]
    for key, name in ((STEP, "training steps"), (TOKENS, "training tokens")):
        if summary.get(key) is not None:
            rows.append((name, f"{summary[key]:,}"))
    if summary.get("seed") is not None:
        rows.append(("seed", str(summary["seed"])))
    for key in sorted(loaded.metrics, key=_card_order):
        multiplier = extrapolation_multiplier(key)
        measured_at = summary.get(extrapolation_context_key(multiplier)) if multiplier is not None else None
        rows.append((label(key, context=measured_at), f"{loaded.metrics[key]:.4f}"))
    return rows


def model_card(loaded: LoadedModel, license: str) -> str:
    """README.md for the Hub: the template (model_card.md: front matter for search and filters, then what the model
    is and how to use it) filled with this model's names and table."""
    info = loaded.info
    pe, attention = info["pe"], info["attention"]
    template = Template(resources.files("src.chat").joinpath(_TEMPLATE).read_text(encoding="utf-8"))
    return template.substitute(
        license=license,
        pe=pe,
        attention=attention,
        name=loaded.summary.get("run_name") or f"{pe}-{attention}",
        grid=(f"{len(PE_REGISTRY.names())} positional encodings x {len(ATTENTION_REGISTRY.names())} "
              "attention mechanisms"),
        tokenizer=describe_tokenizer(loaded.tokenizer),
        table=_table(card_rows(loaded)),
        weights=WEIGHTS,
        model_config=MODEL_CONFIG,
    )


def export(run_dir: str | Path, out_dir: str | Path, license: str = "mit") -> Path:
    """Write the Hub-ready folder for the newest checkpoint of `run_dir` into `out_dir`; return out_dir."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a directory; pass a run dir written by `python -m src.train`")
    ckpt_dir = find_checkpoint_dir(run_dir)
    summary = read_summary(run_dir)
    if not summary:
        raise ExportError(f"{run_dir} has no readable summary.json; pass a run dir written by `python -m src.train`")
    model, _ = load_model(ckpt_dir)  # the weights must read back before they are published
    loaded = LoadedModel(str(run_dir), model, ckpt_dir, summary, tokenizer=read_tokenizer(run_dir) or DEFAULT_TOKENIZER)

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, MODEL_CONFIG):
        shutil.copyfile(ckpt_dir / name, out_dir / name)
    if (run_dir / "config.yaml").is_file():
        shutil.copyfile(run_dir / "config.yaml", out_dir / "config.yaml")
    atomic_write_json(out_dir / "summary.json", summary)
    (out_dir / "README.md").write_text(model_card(loaded, license))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.chat.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run dir (its newest checkpoint is exported)")
    parser.add_argument("out_dir", help="the folder to write (created; files in it are overwritten)")
    parser.add_argument("--license", default="mit", help="license id for the model card (default: mit)")
    args = parser.parse_args(argv)
    try:
        out = export(args.run_dir, args.out_dir, args.license)
    except (ExportError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.run_dir} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
