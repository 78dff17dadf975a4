"""`python -m src.export RUN_DIR OUT_DIR [--license mit] [--no-transformers]` (src/export/hub.py)."""

from __future__ import annotations

import argparse
import sys

from src.checkpoint import CheckpointError
from src.export.hub import ExportError, export
from src.export.transformers_gpt2 import TransformersExportError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.export",
        description="Export a trained run as a Hugging Face Hub-ready folder (and, for a GPT-2-shaped model, a "
                    "transformers GPT-2 in OUT_DIR/transformers).")
    parser.add_argument("run_dir", help="a run dir (its newest checkpoint is exported)")
    parser.add_argument("out_dir", help="the folder to write (created; files in it are overwritten)")
    parser.add_argument("--license", default="mit", help="license id for the model card (default: mit)")
    parser.add_argument("--no-transformers", action="store_true",
                        help="skip the transformers GPT-2 subfolder (written for learned-PE, non-Linformer models)")
    args = parser.parse_args(argv)
    try:
        exported = export(args.run_dir, args.out_dir, args.license, transformers=not args.no_transformers)
    except (ExportError, CheckpointError, TransformersExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.run_dir} -> {exported.folder}")
    if exported.transformers is not None:
        print(f"transformers GPT-2: {exported.transformers} (GPT2LMHeadModel.from_pretrained loads it; logits checked)")
    else:
        print(f"no transformers folder: {exported.no_transformers_reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
