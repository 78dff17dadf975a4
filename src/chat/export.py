"""Export a trained run as a Hugging Face Hub-ready folder: `python -m src.chat.export RUN_DIR OUT_DIR`.

The folder holds what inference needs and nothing else (no optimizer state):
- `model.safetensors`, `model_config.json`: the newest checkpoint's weights and config (`load_model` reads
  the folder directly, so does `python -m src.chat --model OUT_DIR`);
- `summary.json`, `config.yaml`: the run's record, so the chat UI can show its PE, attention and metrics
  (and decode with its `data.tokenizer`);
- `README.md`: a model card with YAML front matter (library_name, license, tags) that the Hub indexes.
Upload it with `hf upload ORG/REPO OUT_DIR [NAME]`; then `python -m src.chat --model ORG/REPO[/NAME]`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from src.atomic import atomic_write_json
from src.chat.store import LoadedModel, read_summary, read_tokenizer
from src.checkpoint import MODEL_CONFIG, WEIGHTS, CheckpointError, find_checkpoint_dir, load_model
from src.data.tokenizer import DEFAULT_TOKENIZER, describe_tokenizer

_METRIC_NAMES = {
    "val/loss": "validation loss (nats/token)",
    "train/loss": "last training loss (nats/token)",
    "hellaswag/acc_norm": "HellaSwag acc_norm",
    "hellaswag/acc": "HellaSwag acc",
}


class ExportError(RuntimeError):
    pass


def _metric_label(key: str, summary: dict) -> str:
    if key.startswith("extrapolation/loss_x"):
        multiple = key.removeprefix("extrapolation/loss_x")
        context = summary.get(f"extrapolation/context_x{multiple}")
        return f"loss at {multiple}x the training context" + (f" ({context} tokens)" if context else "")
    return _METRIC_NAMES.get(key, key)


def model_card(loaded: LoadedModel, license: str) -> str:
    """README.md for the Hub: front matter for search and filters, then what the model is and how it scored."""
    info, summary = loaded.info, loaded.summary
    pe, attention = info["pe"], info["attention"]
    name = summary.get("run_name") or f"{pe}-{attention}"
    context = (f"{info['max_context']} tokens (fixed by the PE)" if info["max_context"] is not None
               else f"trained on {info['block_size']}, extrapolates to longer inputs")
    rows = [
        ("positional encoding", pe),
        ("attention", attention),
        ("parameters", f"{info['num_params']:,}"),
        ("layers / heads / width", f"{info['n_layer']} / {info['n_head']} / {info['n_embd']}"),
        ("context", context),
        ("tokenizer", loaded.tokenizer),
    ]
    for key, label in (("step", "training steps"), ("tokens", "training tokens")):
        if summary.get(key) is not None:
            rows.append((label, f"{summary[key]:,}"))
    if summary.get("seed") is not None:
        rows.append(("seed", str(summary["seed"])))
    # validation loss first: it is the figure the grid is compared on
    ordered = sorted(loaded.metrics.items(), key=lambda kv: (kv[0] != "val/loss", kv[0]))
    metrics = [(_metric_label(k, summary), f"{v:.4f}") for k, v in ordered]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows + metrics)
    return f"""---
library_name: pegrid
license: {license}
pipeline_tag: text-generation
tags:
- pegrid
- gpt2
- text-generation
- pe-{pe}
- attention-{attention}
---

# {name}: GPT-2 with {pe} positional encoding and {attention} attention

A GPT-2-style language model trained from scratch with pegrid (7 positional encodings x 3 attention
mechanisms). Tokenizer: {describe_tokenizer(loaded.tokenizer)}. It is a base model: it
continues text, it was not tuned to follow instructions.

| | |
|---|---|
{table}

## Use

```bash
python -m src.chat --model ORG/REPO[/NAME]          # after uploading this folder, or a local path to it
python -m src.chat --model ORG/REPO --prompt "The attention mechanism" --temperature 0
```

```python
from src.checkpoint import load_model
model, _ = load_model("path/to/this/folder")        # weights from model.safetensors
```

## Files

- `model.safetensors`: weights (the tied output projection is stored once, as `wte.weight`)
- `model_config.json`: the model config (`src.model.build_model` rebuilds the model from it)
- `summary.json`, `config.yaml`: the training run's record and resolved config
"""


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
