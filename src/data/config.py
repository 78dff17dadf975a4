"""Schema of the `data` config group.

Stored in Hydra's ConfigStore as `data_schema` (src/structured.py); every conf/data/*.yaml starts from it and
lists only its source's `name` and what differs from these defaults, so a misspelt key (`data.val_fractoin=0.2`)
fails at compose time, naming the key.
Importing this module (any `import src.data`) is what registers it, and the `padded_vocab` resolver that
conf/model/gpt2.yaml (hence small, tiny) uses: do that before composing.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from src.data.sources import check_source_config
from src.data.tokenizer import DEFAULT_TOKENIZER, check_tokenizer_name, padded_vocab_size
from src.errors import ConfigError
from src.structured import store_schema

DEFAULT_CACHE_DIR = "data_cache"


@dataclass
class DataConfig:
    # which source to read: a name registered in src/data/sources.py (SOURCES), each with its conf/data/<name>.yaml
    name: str = "embedded"
    # where tokenised shards go; relative paths are relative to the cwd. Left at the default, the
    # environment variable PEGRID_DATA_DIR (if set) replaces it, so a cluster can point every run at
    # one shared scratch directory without touching configs.
    cache_dir: str = DEFAULT_CACHE_DIR
    # text_file (required there): the local UTF-8 text file; documents are its blank-line-separated paragraphs
    path: str | None = None
    # hf / fineweb_edu: arguments of datasets.load_dataset(hf_path, hf_name, split=hf_split, ...); hf_path is
    # required there
    hf_path: str | None = None
    hf_name: str | None = None
    hf_split: str = "train"
    hf_data_files: str | None = None  # e.g. hf_path=json hf_data_files=/data/corpus.jsonl
    text_column: str = "text"
    streaming: bool = False  # stream instead of downloading the whole dataset first
    # validation split: either the last val_fraction of the documents (needs the document count up
    # front), or, when val_tokens is set, the first val_tokens tokens of the stream (the only option
    # for streaming sources; the document crossing the boundary is cut and its rest dropped)
    val_fraction: float = 0.1
    val_tokens: int | None = None
    shard_tokens: int = 10_000_000  # tokens per .bin shard (uint16, so 2 bytes each)
    num_proc: int = 1  # tokenizer worker processes; 1 = in-process, <= 0 = all available CPUs
    max_docs: int | None = None  # only use the first max_docs documents (quick runs, tests)
    # gpt2 (GPT-2 BPE, 50257 ids) | bytes (UTF-8 bytes, 256 ids): see src/data/tokenizer.py. The model's
    # vocab_size follows it (conf/model/gpt2.yaml); shards made with one tokenizer are never read as another's.
    tokenizer: str = DEFAULT_TOKENIZER

    def __post_init__(self) -> None:
        check_tokenizer_name(self.tokenizer)
        check_source_config(self)  # a registered name, and the settings that source needs (src/data/sources.py)
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction (the fraction of documents held out for validation) must be in "
                              f"[0, 1), got {self.val_fraction}")
        if not self.shard_tokens > 0:
            raise ConfigError(f"data.shard_tokens must be positive, got {self.shard_tokens}")
        for key in ("val_tokens", "max_docs"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ConfigError(f"data.{key} must be positive or null, got {getattr(self, key)}")

    def num_val_docs(self, num_docs: int) -> int:
        """Documents held out for validation from a source of num_docs: the last val_fraction of them, at least
        one. ConfigError if that would leave none to train on."""
        num_val = max(1, round(num_docs * self.val_fraction))
        if num_val >= num_docs:
            raise ConfigError(f"data={self.name} has {num_docs} document(s) and validation takes {num_val} "
                              f"(data.val_fraction={self.val_fraction}, at least 1), leaving none for training: use "
                              f"more documents (text_file: blank-line-separated paragraphs; data.max_docs) or a "
                              f"smaller data.val_fraction")
        return num_val


def resolve_cache_dir(cfg: DataConfig) -> Path:
    """Absolute cache dir: the config value, or $PEGRID_DATA_DIR when the value is the default."""
    cache_dir = cfg.cache_dir
    if cache_dir == DEFAULT_CACHE_DIR and os.environ.get("PEGRID_DATA_DIR"):
        cache_dir = os.environ["PEGRID_DATA_DIR"]
    return Path(cache_dir).expanduser().absolute()


store_schema("data", DataConfig)
# `vocab_size: ${padded_vocab:${data.tokenizer}}` in conf/model/gpt2.yaml: the model's vocabulary follows the data's
OmegaConf.register_new_resolver("padded_vocab", padded_vocab_size, replace=True)
