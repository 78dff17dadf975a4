"""Schema of the `data` config group.

Registered with Hydra's ConfigStore as `data/data_schema`; every conf/data/*.yaml lists it first in
its defaults, so a misspelt key (`data.val_fractoin=0.2`) fails at compose time, naming the key.
Importing this module (any `import src.data`) is what registers it: do that before composing.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore

DEFAULT_CACHE_DIR = "data_cache"


@dataclass
class DataConfig:
    # which source to read: embedded | text_file | hf | fineweb_edu (= hf with fineweb-edu preset)
    name: str = "embedded"
    # where tokenised shards go; relative paths are relative to the cwd. Left at the default, the
    # environment variable PEGRID_DATA_DIR (if set) replaces it, so a cluster can point every run at
    # one shared scratch directory without touching configs.
    cache_dir: str = DEFAULT_CACHE_DIR
    # text_file: the local UTF-8 text file; documents are its blank-line-separated paragraphs
    path: str | None = None
    # hf / fineweb_edu: arguments of datasets.load_dataset(hf_path, hf_name, split=hf_split, ...)
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


def resolve_cache_dir(cfg: DataConfig) -> Path:
    """Absolute cache dir: the config value, or $PEGRID_DATA_DIR when the value is the default."""
    cache_dir = cfg.cache_dir
    if cache_dir == DEFAULT_CACHE_DIR and os.environ.get("PEGRID_DATA_DIR"):
        cache_dir = os.environ["PEGRID_DATA_DIR"]
    return Path(cache_dir).expanduser().absolute()


ConfigStore.instance().store(group="data", name="data_schema", node=DataConfig)
