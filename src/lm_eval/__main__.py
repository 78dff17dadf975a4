"""`python -m src.lm_eval ARGS`: lm-eval's command line (every option of `lm_eval`/`lm-eval run`) with the
`pegrid` model type registered, e.g.

    python -m src.lm_eval --model pegrid --model_args pretrained=outputs/<run>,device=cpu --tasks hellaswag

lm-eval finds model types only in its own registry and has no entry point for outside packages (its issues
#1621, #1457, #3282), so this wrapper imports the adapter, which registers itself, and hands over to lm-eval.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print('error: lm-evaluation-harness is not installed; install it with pip install -e ".[eval]"',
              file=sys.stderr)
        sys.exit(2)
    from src.chat.store import ModelLoadError
    from src.lm_eval.adapter import PegridLMError  # importing it registers the `pegrid` model type

    sys.argv[0] = "python -m src.lm_eval"
    try:
        cli_evaluate()
    except (ModelLoadError, PegridLMError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
