"""Tokenise a document source once into flat uint16 shards that training memory-maps.

<cache_dir>/<dataset_key>/ holds
  train_000000.bin, ..., val_000000.bin  raw np.uint16 token ids of data.tokenizer, its EOT (gpt2:
                                         50256, bytes: 0) before every document (as in build-nanogpt);
                                         a document may continue from one shard into the next
  meta.json       what was tokenised and with which tokenizer, token counts per shard, "complete": true;
                  written last and atomically, so its presence means the dataset is finished
  progress.json   only while unfinished: the finished shards and where in the document stream the
                  next shard starts, so a rerun after an interruption continues instead of restarting

dataset_key = <readable source name>-<sha1 of source identity and layout settings>[:10], so two
sources, or one source tokenised or cut into shards or splits differently, never share a directory; a
directory whose meta.json names another tokenizer is refused, never read.

Usage: python -m src.data.prepare data=fineweb_edu [data.cache_dir=/scratch/pegrid]
"""

import fcntl
import functools
import hashlib
import json
import multiprocessing
import os
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from src.atomic import atomic_write
from src.data.config import DataConfig, resolve_cache_dir
from src.data.sources import DataUnavailableError, check_source, describe_source, open_source
from src.data.tokenizer import get_tokenizer
from src.errors import ConfigError, exit_bad_input
from src.structured import to_dataclass

SPLITS = ("train", "val")


def dataset_dir(cfg: DataConfig) -> Path:
    """Where prepare() puts this config's shards."""
    name, identity = describe_source(cfg)
    key = json.dumps({"source": identity, "layout": _layout(cfg)}, sort_keys=True)
    return resolve_cache_dir(cfg) / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def load_meta(shard_dir: str | Path) -> dict:
    """meta.json of a finished dataset; a clear error if prepare() has not completed there."""
    meta_path = Path(shard_dir) / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{shard_dir} is not a prepared dataset (no meta.json): run "
                                f"`python -m src.data.prepare data=...` or call ensure_prepared(cfg.data)")
    return json.loads(meta_path.read_text())


def ensure_prepared(cfg: DataConfig | DictConfig | dict) -> Path:
    """prepare() for a Hydra `data` node (what the trainer holds); returns the shard directory."""
    return prepare(to_dataclass(DataConfig, cfg))


def prepare(cfg: DataConfig) -> Path:
    """Tokenise cfg's source into shards unless that is already done; returns the shard directory.

    Safe to call from several processes at once: one works, the others wait on a file lock.
    """
    out_dir = dataset_dir(cfg)
    if _is_complete(out_dir, cfg):
        return out_dir
    check_source(cfg)  # an unreadable or binary file fails before the shard dir is made
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_complete(out_dir, cfg):
            _prepare_locked(cfg, out_dir)
    return out_dir


def _is_complete(out_dir: Path, cfg: DataConfig) -> bool:
    meta_path = out_dir / "meta.json"
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    if meta.get("tokenizer") != cfg.tokenizer:  # the key hashes the tokenizer: only a copied-in dir gets here
        raise ValueError(f"{out_dir} holds {meta.get('tokenizer')} tokens, not data.tokenizer={cfg.tokenizer}'s: "
                         f"remove it, it will be prepared again")
    return meta.get("complete") is True


@dataclass
class _Progress:
    """Everything a rerun needs to continue; saved right after each shard is written."""

    shards: dict = field(default_factory=lambda: {split: [] for split in SPLITS})  # tokens per shard
    tokens: dict = field(default_factory=lambda: {split: 0 for split in SPLITS})
    docs: dict = field(default_factory=lambda: {split: 0 for split in SPLITS})  # documents begun
    next_doc: int = 0  # first document not fully inside finished shards
    doc_offset: int = 0  # its tokens already in finished shards; the rest continues in `split`
    split: str = "train"


def _prepare_locked(cfg: DataConfig, out_dir: Path) -> None:
    progress_path = out_dir / "progress.json"
    progress = _Progress(**json.loads(progress_path.read_text())) if progress_path.is_file() else _Progress()
    num_proc = cfg.num_proc if cfg.num_proc > 0 else len(os.sched_getaffinity(0))
    get_tokenizer(cfg.tokenizer)  # built once here, inherited by the forked workers
    tokenize = functools.partial(_tokenize, cfg.tokenizer)
    # Workers are forked (starts in well under a second; spawn re-imports torch & co in each) and
    # before the source is opened, because a streaming source starts threads and forking a
    # process that runs threads is unsafe.
    with multiprocessing.get_context("fork").Pool(num_proc) if num_proc > 1 else nullcontext() as pool:
        documents = open_source(cfg, start=progress.next_doc)
        split_of = _splitter(cfg, documents.count, progress)
        token_arrays = pool.imap(tokenize, documents.texts, chunksize=16) if pool else map(tokenize, documents.texts)
        with tqdm(desc=f"tokenising into {out_dir.name}", unit="tok", unit_scale=True,
                  initial=sum(progress.tokens.values())) as bar:
            _ShardWriter(out_dir, cfg.shard_tokens, progress, progress_path, bar).write(
                token_arrays, split_of, cfg.val_tokens)
    for split in SPLITS:
        if progress.tokens[split] == 0:
            raise ValueError(f"{cfg.name}: the {split} split came out empty ({progress.tokens} tokens, "
                             f"{progress.docs} documents); use more data or change data.val_fraction / "
                             f"data.val_tokens")
    _write_meta(cfg, out_dir, progress)
    progress_path.unlink()


def _layout(cfg: DataConfig) -> dict:
    """The settings besides the source that change the bytes on disk."""
    val = {"tokens": cfg.val_tokens} if cfg.val_tokens is not None else {"fraction": cfg.val_fraction}
    return {"tokenizer": cfg.tokenizer, "shard_tokens": cfg.shard_tokens, "val": val, "max_docs": cfg.max_docs}


def _splitter(cfg: DataConfig, num_docs, progress: _Progress):
    """Which split document i goes to: the last val_fraction of documents, or the first val_tokens."""
    if cfg.val_tokens is not None:
        return lambda i: "val" if progress.tokens["val"] < cfg.val_tokens else "train"
    if num_docs is None:  # a stream; its source's validate() refuses this config already, so this is a backstop
        raise ConfigError(f"data={cfg.name} is a stream of unknown length, so data.val_fraction cannot be applied: "
                          f"set data.val_tokens=<tokens to hold out from the start>")
    num_train = num_docs - cfg.num_val_docs(num_docs)
    return lambda i: "train" if i < num_train else "val"


def _tokenize(tokenizer: str, text: str) -> np.ndarray:
    enc = get_tokenizer(tokenizer)
    return np.array([enc.eot_token, *enc.encode_ordinary(text)], dtype=np.uint16)


class _ShardWriter:
    """Packs document tokens into fixed-size shards; splits are contiguous runs of documents."""

    def __init__(self, out_dir: Path, shard_tokens: int, progress: _Progress, progress_path: Path, bar):
        self.out_dir, self.progress, self.progress_path, self.bar = out_dir, progress, progress_path, bar
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.filled = 0

    def write(self, token_arrays: Iterable[np.ndarray], split_of, val_tokens) -> None:
        progress = self.progress
        split, resume_doc, resume_offset = progress.split, progress.next_doc, progress.doc_offset
        index = resume_doc
        for index, tokens in enumerate(token_arrays, start=resume_doc):
            if index == resume_doc and resume_offset:  # resuming inside this document
                consumed = resume_offset
                tokens = tokens[consumed:]
            else:
                if split_of(index) != split and self.filled:
                    self._flush(split, next_doc=index, doc_offset=0)
                split, consumed = split_of(index), 0
                progress.docs[split] += 1
            if split == "val" and val_tokens is not None:  # the stream head: cut at exactly val_tokens
                tokens = tokens[: val_tokens - progress.tokens["val"]]
            while len(tokens):
                take = min(len(tokens), len(self.buffer) - self.filled)
                self.buffer[self.filled : self.filled + take] = tokens[:take]
                self.filled, consumed, tokens = self.filled + take, consumed + take, tokens[take:]
                progress.tokens[split] += take
                self.bar.update(take)
                if self.filled == len(self.buffer):
                    self._flush(split, next_doc=index, doc_offset=consumed)
        if self.filled:
            self._flush(split, next_doc=index + 1, doc_offset=0)

    def _flush(self, split: str, next_doc: int, doc_offset: int) -> None:
        progress = self.progress
        shard_name = f"{split}_{len(progress.shards[split]):06d}.bin"
        atomic_write(self.out_dir / shard_name, self.buffer[: self.filled])
        progress.shards[split].append(self.filled)
        progress.next_doc, progress.doc_offset, progress.split = next_doc, doc_offset, split
        atomic_write(self.progress_path, json.dumps(asdict(progress)).encode())
        self.filled = 0


def _write_meta(cfg: DataConfig, out_dir: Path, progress: _Progress) -> None:
    name, identity = describe_source(cfg)
    enc = get_tokenizer(cfg.tokenizer)
    splits = {
        split: {
            "tokens": progress.tokens[split],
            "docs": progress.docs[split],
            "shards": [{"file": f"{split}_{i:06d}.bin", "tokens": n} for i, n in enumerate(progress.shards[split])],
        }
        for split in SPLITS
    }
    meta = {"dataset_key": out_dir.name, "source": name, "identity": identity, "layout": _layout(cfg),
            "tokenizer": cfg.tokenizer, "vocab_size": enc.n_vocab, "eot_token": enc.eot_token, "dtype": "uint16",
            "splits": splits, "complete": True}
    atomic_write(out_dir / "meta.json", json.dumps(meta, indent=2).encode())


@hydra.main(version_base=None, config_path="../../conf", config_name="prepare")
def main(cfg: DictConfig) -> None:
    try:
        out_dir = ensure_prepared(cfg.data)
    except (ConfigError, DataUnavailableError) as error:  # bad input, or offline: one line, exit 2
        exit_bad_input(error)
    meta = load_meta(out_dir)
    print(f"shards: {out_dir} (tokenizer {meta['tokenizer']})")
    for split, info in meta["splits"].items():
        print(f"{split}: {info['tokens']:,} tokens, {info['docs']:,} documents, {len(info['shards'])} shard(s)")


if __name__ == "__main__":
    main()
