"""Publishing a trained model: `python -m src.export RUN_DIR OUT_DIR`.

- `hub.py`: the Hub-ready folder (weights, config, run record) and its model card (`model_card.md`);
- `transformers_gpt2.py`: the `transformers/` subfolder, a standard GPT-2, for a model that is GPT-2;
- `__main__.py`: the command line.
"""

from src.export.hub import Exported, ExportError, export, model_card

__all__ = ["Exported", "ExportError", "export", "model_card"]
