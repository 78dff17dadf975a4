"""Document sources: each yields the same strings in the same order on every run.

A source is a `Source` subclass registered under the name that selects it (`data.name`, set by
conf/data/<name>.yaml) with `@register_source("<name>")`; its docstring says what it reads. Everything that
depends on which source a config names (its settings' checks, the dataset's identity, the fast readability
check, opening it, whether its documents can be counted up front) goes through this registry: there is no other
list or branch over source names. `SOURCES` is the registered names, in registration order.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from src.errors import ConfigError

if TYPE_CHECKING:  # src/data/config.py imports this module to validate data.name: no import back at run time
    from src.data.config import DataConfig

_HEAD_BYTES = 1 << 16  # what check_source reads of a text file


class DataUnavailableError(RuntimeError):
    """The data could not be found or reached; the message says what was looked for and what to do."""


@dataclass
class Documents:
    texts: Iterator[str]  # documents from the requested start on
    count: int | None  # documents in the whole source; None for a stream of unknown length


class Source:
    """One kind of document source. `describe` and `open` are required; the rest have defaults."""

    # Its document count is known without downloading or tokenising, so the preflight checks, before any work,
    # that data.val_fraction leaves documents for both splits.
    counted_locally: bool = False

    def validate(self, cfg: DataConfig) -> None:
        """ConfigError for settings this source cannot work with (called when a DataConfig is made)."""

    def describe(self, cfg: DataConfig) -> tuple[str, dict]:
        """(readable name, identity): the identity holds everything that determines the documents."""
        raise NotImplementedError

    def check(self, cfg: DataConfig) -> None:
        """Fail in milliseconds when the data is plainly missing or unreadable (before a shard dir is made)."""

    def open(self, cfg: DataConfig, start: int) -> Documents:
        """The documents from index `start` on, limited to cfg.max_docs."""
        raise NotImplementedError


_REGISTRY: dict[str, Source] = {}


def register_source(*names: str) -> Callable[[type[Source]], type[Source]]:
    """Class decorator: `data.name=<name>` (any of `names`) reads documents with this source."""

    def decorator(cls: type[Source]) -> type[Source]:
        for name in names:
            if name in _REGISTRY:
                raise ValueError(f"data source {name!r} is registered twice")
            _REGISTRY[name] = cls()
        return cls

    return decorator


def source_for(name: str) -> Source:
    """The source registered under `name`; ConfigError naming the choices for any other name."""
    if name not in _REGISTRY:
        raise ConfigError(f"data.name={name} is not a source: use data={', data='.join(_REGISTRY)}")
    return _REGISTRY[name]


def check_source_config(cfg: DataConfig) -> None:
    """ConfigError unless cfg names a registered source and has the settings that source needs."""
    source_for(cfg.name).validate(cfg)


def describe_source(cfg: DataConfig) -> tuple[str, dict]:
    """(readable name, identity): the identity holds everything that determines the documents."""
    return source_for(cfg.name).describe(cfg)


def check_source(cfg: DataConfig) -> None:
    """Fail in milliseconds on data that is plainly missing or unreadable (a text file: see TextFileSource)."""
    source_for(cfg.name).check(cfg)


def open_source(cfg: DataConfig, start: int = 0) -> Documents:
    """Open the source and return its documents from index `start` on (limited to cfg.max_docs)."""
    return source_for(cfg.name).open(cfg, start)


def local_document_count(cfg: DataConfig) -> int | None:
    """How many documents the source has (after cfg.max_docs) when that is known without downloading or
    tokenising; None for the others (an hf dataset is counted by downloading it)."""
    return open_source(cfg).count if source_for(cfg.name).counted_locally else None


def documents_in_memory(texts: list[str], cfg: DataConfig, start: int) -> Documents:
    texts = texts[: cfg.max_docs]
    return Documents(texts=iter(texts[start:]), count=len(texts))


@register_source("embedded")
class EmbeddedSource(Source):
    """The CPython `pydoc_data.topics` help pages (79 documents, ~139k tokens), always there, in a fixed order
    shuffled by topic-name hash."""

    counted_locally = True

    def describe(self, cfg: DataConfig) -> tuple[str, dict]:
        return "embedded", {"source": "embedded", "sha1": _sha1("\x00".join(_embedded_documents()))}

    def open(self, cfg: DataConfig, start: int) -> Documents:
        return documents_in_memory(_embedded_documents(), cfg, start)


@register_source("text_file")
class TextFileSource(Source):
    """A local UTF-8 file (data.path); its blank-line-separated paragraphs are the documents."""

    counted_locally = True

    def validate(self, cfg: DataConfig) -> None:
        if not cfg.path:
            raise ConfigError("data=text_file needs a file: add data.path=/path/to/corpus.txt")

    def describe(self, cfg: DataConfig) -> tuple[str, dict]:
        path = _text_file_path(cfg)
        return f"text_file-{_slug(path.stem)}", {"source": "text_file", **_file_identity(path)}

    def check(self, cfg: DataConfig) -> None:
        """Missing, unreadable or not UTF-8 text, judged by its first 64 KiB: reading it all is the tokeniser's
        job, and a bad byte further on fails that read the same way."""
        path = _text_file_path(cfg)
        try:
            with open(path, "rb") as f:
                head = f.read(_HEAD_BYTES)
        except OSError as error:
            raise DataUnavailableError(f"cannot read text file {path} ({error.strerror}): fix data.path=...") from None
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head)  # not final: a character cut at 64 KiB is fine
        except UnicodeDecodeError as error:
            raise _not_utf8(path, error) from None

    def open(self, cfg: DataConfig, start: int) -> Documents:
        return documents_in_memory(_paragraphs(_text_file_path(cfg)), cfg, start)


@register_source("hf", "fineweb_edu")
class HFSource(Source):
    """Any `datasets.load_dataset(...)` dataset, streamed or downloaded; with hf_path=json and
    hf_data_files=<file> it reads a local jsonl through the same code. fineweb_edu: this source with the
    HuggingFaceFW/fineweb-edu preset of conf/data/fineweb_edu.yaml (a new preset needs only a YAML with
    `name: hf`)."""

    def validate(self, cfg: DataConfig) -> None:
        if not cfg.hf_path:
            raise ConfigError("data=hf needs a dataset: add data.hf_path=<hub id, or json/text/parquet>")
        if cfg.streaming and cfg.val_tokens is None:
            raise ConfigError(f"data={cfg.name} is streamed, a stream of unknown length, so data.val_fraction cannot "
                              f"be applied: set data.val_tokens=<tokens to hold out from the start>")

    def describe(self, cfg: DataConfig) -> tuple[str, dict]:
        name = "-".join(_slug(part) for part in ("hf", cfg.hf_path, cfg.hf_name) if part)
        data_files = _file_identity(Path(cfg.hf_data_files)) if cfg.hf_data_files else None
        identity = {"source": "hf", "path": cfg.hf_path, "name": cfg.hf_name, "split": cfg.hf_split,
                    "data_files": data_files, "text_column": cfg.text_column}
        return name, identity

    def open(self, cfg: DataConfig, start: int) -> Documents:
        return _open_hf(cfg, start)


SOURCES = tuple(_REGISTRY)


def _embedded_documents() -> list[str]:
    from pydoc_data.topics import topics

    # A fixed pseudo-random order (by hash of the topic name), so that the validation split, the last
    # documents, is a random sample of topics; in alphabetical order it was the easier tail ("with"...).
    return [topics[key] for key in sorted(topics, key=_sha1)]


def _text_file_path(cfg: DataConfig) -> Path:
    path = Path(cfg.path).expanduser().absolute()
    if not path.is_file():
        raise DataUnavailableError(f"text file {path} does not exist or is not a file: fix data.path=...")
    return path


def _paragraphs(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise _not_utf8(path, error) from None
    paragraphs = re.split(r"\n[ \t\r]*\n", text)
    return [p.strip("\r\n") for p in paragraphs if p.strip()]


def _not_utf8(path: Path, error: UnicodeDecodeError) -> ConfigError:
    return ConfigError(f"data.path={path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                       f"{error.start}): data=text_file reads UTF-8 text; convert the file (iconv -t UTF-8) or "
                       f"pass another one")


def _open_hf(cfg: DataConfig, start: int) -> Documents:
    import datasets

    what = cfg.hf_path + (f" ({cfg.hf_name})" if cfg.hf_name else "")
    advice = "check your network (and HF_HUB_OFFLINE), or use data=text_file data.path=<local file>"
    on_hub = "/" in cfg.hf_path and not os.path.exists(cfg.hf_path)
    if on_hub and not datasets.config.HF_HUB_OFFLINE:
        _probe_hub(f"could not reach the Hugging Face Hub for {what}: {advice}")
    try:
        dataset = datasets.load_dataset(cfg.hf_path, cfg.hf_name, split=cfg.hf_split,
                                        data_files=cfg.hf_data_files, streaming=cfg.streaming)
    except ConnectionError as error:  # also raised at once in offline mode for data not in the cache
        raise DataUnavailableError(f"could not reach the Hugging Face Hub for {what} "
                                   f"({_first_line(error)}): {advice}") from error
    except FileNotFoundError as error:
        raise DataUnavailableError(f"found no dataset {what} ({_first_line(error)}): fix data.hf_path "
                                   f"/ data.hf_data_files, or use data=text_file data.path=<local file>"
                                   ) from error
    if dataset.column_names is not None and cfg.text_column not in dataset.column_names:
        raise ConfigError(f"{what} has no column {cfg.text_column!r} (it has {dataset.column_names}): "
                          f"set data.text_column=...")
    dataset = dataset.select_columns([cfg.text_column])
    if cfg.max_docs is not None:
        dataset = dataset.take(cfg.max_docs)
    count = None if cfg.streaming else len(dataset)
    texts = (example[cfg.text_column] for example in dataset.skip(start))
    return Documents(texts=texts, count=count)


def _probe_hub(message: str) -> None:
    """Fail in well under a minute when the Hub is unreachable (datasets retries for ~25 s)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=10)
    except Exception as error:  # any transport error: DNS, refused, timeout, proxy, TLS
        raise DataUnavailableError(f"{message} ({_first_line(error)})") from error


def _file_identity(path: Path) -> dict:
    """A file's identity without reading it: path, size and modification time."""
    path = path.expanduser().absolute()
    if not path.exists():
        return {"path": str(path)}
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60]


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
