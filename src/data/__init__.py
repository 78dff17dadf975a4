"""Data pipeline: sources -> GPT-2 tokens in uint16 shards -> seeded (x, y) batches."""

import warnings

from src.data.config import DataConfig  # importing registers the data_schema Hydra schema
from src.data.loader import TokenLoader, split_tokens
from src.data.prepare import ensure_prepared, prepare
from src.data.sources import DataUnavailableError
from src.data.tokenizer import EOT_TOKEN, get_tokenizer

__all__ = [
    "EOT_TOKEN",
    "DataConfig",
    "DataUnavailableError",
    "TokenLoader",
    "ensure_prepared",
    "get_tokenizer",
    "prepare",
    "split_tokens",
]

# `python -m src.data.prepare` imports this package, hence src.data.prepare, before it runs that
# module as __main__; runpy then warns about the double import, which is harmless here.
warnings.filterwarnings("ignore", message="'src.data.prepare' found in sys.modules", category=RuntimeWarning)
