"""Data pipeline: tokenizer, sources, prepare (shards, idempotence, resume), loader, configs, CLI."""

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from src.data import (
    EOT_TOKEN,
    DataConfig,
    DataUnavailableError,
    TokenLoader,
    ensure_prepared,
    get_tokenizer,
    prepare,
    sources,
    split_tokens,
)
from src.data.config import resolve_cache_dir
from src.data.sources import SOURCES, _embedded_documents
from src.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
prepare_module = importlib.import_module("src.data.prepare")  # the package attribute is the function


def read_split(shard_dir: Path, split: str) -> np.ndarray:
    meta = json.loads((shard_dir / "meta.json").read_text())
    shards = [np.fromfile(shard_dir / s["file"], dtype=np.uint16) for s in meta["splits"][split]["shards"]]
    return np.concatenate(shards)


def decode_documents(tokens: np.ndarray) -> list[str]:
    """Split a split's tokens at EOT (one before every document) and decode each document."""
    assert tokens[0] == EOT_TOKEN
    starts = np.flatnonzero(tokens == EOT_TOKEN).tolist() + [len(tokens)]
    return [get_tokenizer().decode(tokens[a + 1 : b].tolist()) for a, b in zip(starts, starts[1:])]


def file_states(directory: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.iterdir())}


def write_paragraphs(path: Path, count: int) -> list[str]:
    paragraphs = [f"Paragraph {i}: the quick brown fox {i} jumps over the lazy dog.\nSecond line {i}."
                  for i in range(count)]
    path.write_text("\n\n".join(paragraphs) + "\n")
    return paragraphs


@pytest.fixture(scope="module")
def embedded_dir(tmp_path_factory) -> Path:
    return prepare(DataConfig(name="embedded", cache_dir=str(tmp_path_factory.mktemp("cache")), shard_tokens=50_000))


# --- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_gpt2_ids():
    enc = get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_TOKEN] == [50256]
    assert enc.n_vocab == 50257
    assert get_tokenizer() is enc


# --- prepare -----------------------------------------------------------------------------------


def test_embedded_prepare_writes_complete_disjoint_splits(embedded_dir):
    meta = json.loads((embedded_dir / "meta.json").read_text())
    assert meta["complete"] is True and meta["dtype"] == "uint16" and meta["vocab_size"] == 50257
    assert embedded_dir.name.startswith("embedded-")
    assert not (embedded_dir / "progress.json").exists()
    for split in ("train", "val"):
        for shard in meta["splits"][split]["shards"]:
            assert (embedded_dir / shard["file"]).stat().st_size == 2 * shard["tokens"]
    assert [s["file"] for s in meta["splits"]["val"]["shards"]] == ["val_000000.bin"]
    assert len(meta["splits"]["train"]["shards"]) == 3

    documents = _embedded_documents()
    train, val = read_split(embedded_dir, "train"), read_split(embedded_dir, "val")
    assert 130_000 < len(train) + len(val) < 150_000
    assert int((train == EOT_TOKEN).sum() + (val == EOT_TOKEN).sum()) == len(documents) == 79
    assert decode_documents(train) == documents[:71]  # the last 10% of documents are validation
    assert decode_documents(val) == documents[71:]
    assert meta["splits"]["train"]["docs"] == 71 and meta["splits"]["val"]["docs"] == 8


def test_prepare_is_idempotent(embedded_dir, monkeypatch):
    before = file_states(embedded_dir)
    monkeypatch.setattr(prepare_module, "open_source", lambda *a, **k: pytest.fail("source reopened"))
    cfg = DataConfig(name="embedded", cache_dir=str(embedded_dir.parent), shard_tokens=50_000)
    assert prepare(cfg) == embedded_dir
    assert file_states(embedded_dir) == before


def test_dataset_keys_separate_sources_and_layouts(tmp_path):
    corpus = tmp_path / "corpus.txt"
    write_paragraphs(corpus, 5)
    dirs = {
        prepare_module.dataset_dir(DataConfig(name="embedded", cache_dir=str(tmp_path))),
        prepare_module.dataset_dir(DataConfig(name="embedded", cache_dir=str(tmp_path), shard_tokens=7)),
        prepare_module.dataset_dir(DataConfig(name="embedded", cache_dir=str(tmp_path), val_fraction=0.2)),
        prepare_module.dataset_dir(DataConfig(name="text_file", cache_dir=str(tmp_path), path=str(corpus))),
        prepare_module.dataset_dir(DataConfig(name="hf", cache_dir=str(tmp_path), hf_path="a/b")),
        prepare_module.dataset_dir(DataConfig(name="hf", cache_dir=str(tmp_path), hf_path="a/b", hf_name="c")),
    }
    assert len(dirs) == 6


class Interrupted(Exception):
    pass


@pytest.mark.parametrize(
    "source, layout",
    [
        ("embedded", dict(shard_tokens=20_000, num_proc=1)),  # last 10% of documents are val
        ("text_file", dict(shard_tokens=500, val_tokens=1_200, num_proc=2)),  # first 1200 tokens are val
    ],
)
def test_interrupted_prepare_resumes_to_identical_shards(tmp_path, monkeypatch, source, layout):
    corpus = tmp_path / "corpus.txt"
    write_paragraphs(corpus, 200)
    settings = dict(name=source, path=str(corpus), **layout)
    clean_dir = prepare(DataConfig(cache_dir=str(tmp_path / "clean"), **{**settings, "num_proc": 1}))

    cfg = DataConfig(cache_dir=str(tmp_path / "resumed"), **settings)
    real_write, shards_written = prepare_module.atomic_write, []

    def write_then_crash(path, data):
        if path.suffix == ".bin":
            if len(shards_written) == 3:
                raise Interrupted
            shards_written.append(path.name)
        real_write(path, data)

    monkeypatch.setattr(prepare_module, "atomic_write", write_then_crash)
    with pytest.raises(Interrupted):
        prepare(cfg)
    out_dir = prepare_module.dataset_dir(cfg)
    assert not (out_dir / "meta.json").exists()
    progress = json.loads((out_dir / "progress.json").read_text())
    assert progress["next_doc"] > 0
    finished = {name: (out_dir / name).stat().st_mtime_ns for name in shards_written}

    monkeypatch.setattr(prepare_module, "atomic_write", real_write)
    real_open, starts = prepare_module.open_source, []
    monkeypatch.setattr(prepare_module, "open_source",
                        lambda cfg, start: starts.append(start) or real_open(cfg, start=start))
    assert prepare(cfg) == out_dir
    assert starts == [progress["next_doc"]]  # documents before the resume point are not re-read
    assert {name: (out_dir / name).stat().st_mtime_ns for name in finished} == finished
    shard_names = sorted(p.name for p in clean_dir.glob("*.bin"))
    assert shard_names == sorted(p.name for p in out_dir.glob("*.bin")) and len(shard_names) > 4
    for name in shard_names:
        assert (clean_dir / name).read_bytes() == (out_dir / name).read_bytes(), name
    clean_meta, resumed_meta = (json.loads((d / "meta.json").read_text()) for d in (clean_dir, out_dir))
    assert clean_meta["splits"] == resumed_meta["splits"]


def test_text_file_source(tmp_path):
    corpus = tmp_path / "corpus.txt"
    paragraphs = write_paragraphs(corpus, 20)
    shard_dir = prepare(DataConfig(name="text_file", path=str(corpus), cache_dir=str(tmp_path / "cache")))
    assert decode_documents(read_split(shard_dir, "train")) == paragraphs[:18]
    assert decode_documents(read_split(shard_dir, "val")) == paragraphs[18:]
    assert shard_dir.name.startswith("text_file-corpus-")


def test_text_file_missing_or_unset_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataUnavailableError, match="nope.txt does not exist"):
        prepare(DataConfig(name="text_file", path=str(tmp_path / "nope.txt"), cache_dir=str(tmp_path)))
    with pytest.raises(DataUnavailableError, match="not a file"):
        prepare(DataConfig(name="text_file", path=str(tmp_path), cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="data.path="):
        prepare(DataConfig(name="text_file", cache_dir=str(tmp_path)))


def test_hf_source_reads_local_jsonl_through_datasets(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    texts = [f"Document number {i}. " + "Some words here. " * (i % 7 + 1) for i in range(60)]
    data_file = tmp_path / "corpus.jsonl"
    data_file.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts)))
    base = dict(name="hf", hf_path="json", hf_data_files=str(data_file), text_column="body", num_proc=1)

    shard_dir = prepare(DataConfig(cache_dir=str(tmp_path / "a"), **base))
    assert decode_documents(read_split(shard_dir, "train")) == texts[:54]
    assert decode_documents(read_split(shard_dir, "val")) == texts[54:]

    streamed = prepare(DataConfig(cache_dir=str(tmp_path / "b"), streaming=True, val_tokens=300, max_docs=40, **base))
    val, train = read_split(streamed, "val"), read_split(streamed, "train")
    assert len(val) == 300  # the head of the stream, cut at exactly val_tokens
    train_docs = decode_documents(train)
    assert len(decode_documents(val)) + len(train_docs) == 40 and train_docs[-1] == texts[39]

    with pytest.raises(ValueError, match="data.val_tokens"):
        prepare(DataConfig(cache_dir=str(tmp_path / "c"), streaming=True, **base))
    with pytest.raises(ValueError, match="data.text_column"):
        prepare(DataConfig(cache_dir=str(tmp_path / "d"), **{**base, "text_column": "text"}))
    with pytest.raises(DataUnavailableError, match="missing.jsonl"):
        prepare(DataConfig(cache_dir=str(tmp_path / "e"), **{**base, "hf_data_files": str(tmp_path / "missing.jsonl")}))


def test_hf_offline_fails_fast_with_clear_error(tmp_path):
    code = (
        "from src.data import DataConfig, DataUnavailableError, prepare\n"
        f"cfg = DataConfig(name='hf', hf_path='pegrid-test/no-such-dataset', cache_dir={str(tmp_path)!r})\n"
        "try:\n    prepare(cfg)\nexcept DataUnavailableError as error:\n    print('ERROR', error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 30, "offline failure should take seconds"
    [line] = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert "pegrid-test/no-such-dataset" in line and "data=text_file" in line


def test_unreachable_hub_fails_fast_with_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    started = time.monotonic()
    with pytest.raises(DataUnavailableError, match="could not reach the Hugging Face Hub for HuggingFaceFW"):
        prepare(DataConfig(name="fineweb_edu", hf_path="HuggingFaceFW/fineweb-edu", hf_name="sample-10BT",
                           streaming=True, val_tokens=100, cache_dir=str(tmp_path)))
    assert time.monotonic() - started < 15


def test_a_registered_source_is_all_the_pipeline_needs(tmp_path, monkeypatch):
    """Adding a source is one registered class (and its conf/data YAML): its checks, the dataset key, prepare and
    the up-front document count all dispatch on the name through the registry alone."""
    monkeypatch.setattr(sources, "_REGISTRY", dict(sources._REGISTRY))  # registered for this test only
    texts = [f"Number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(20)]

    @sources.register_source("numbers")
    class NumberSource(sources.Source):
        counted_locally = True

        def validate(self, cfg):
            if cfg.max_docs is not None and cfg.max_docs < 10:
                raise ConfigError("data=numbers needs 10 documents at least")

        def describe(self, cfg):
            return "numbers", {"source": "numbers", "count": len(texts)}

        def open(self, cfg, start):
            return sources.documents_in_memory(texts, cfg, start)

    cfg = DataConfig(cache_dir=str(tmp_path), num_proc=1)
    cfg.name = "numbers"  # named after construction: the test does not depend on how DataConfig checks names
    sources.check_source_config(cfg)
    assert sources.local_document_count(cfg) == 20
    shard_dir = prepare(cfg)
    assert shard_dir.name.startswith("numbers-") and prepare_module.load_meta(shard_dir)["source"] == "numbers"
    assert decode_documents(read_split(shard_dir, "train")) == texts[:18]
    assert decode_documents(read_split(shard_dir, "val")) == texts[18:]
    cfg.max_docs = 5
    with pytest.raises(ConfigError, match="10 documents"):
        sources.check_source_config(cfg)
    with pytest.raises(ConfigError, match="data.name=nope is not a source: use data=embedded, .*data=numbers"):
        sources.source_for("nope")
    with pytest.raises(ValueError, match="registered twice"):
        sources.register_source("numbers")(NumberSource)


def test_each_source_checks_its_own_settings():
    """The per-source checks (a text file needs data.path, an hf dataset data.hf_path, a stream data.val_tokens)
    live in the source classes; cfgs are made valid and then broken, since DataConfig refuses them when made."""
    for name, key, message in (("text_file", "path", "data=text_file needs a file"),
                               ("hf", "hf_path", "data=hf needs a dataset"),
                               ("fineweb_edu", "val_tokens", "data=fineweb_edu is streamed")):
        cfg = DataConfig(name=name, path="x.txt", hf_path="org/data", streaming=name == "fineweb_edu", val_tokens=10)
        sources.check_source_config(cfg)
        setattr(cfg, key, None)
        with pytest.raises(ConfigError, match=message):
            sources.check_source_config(cfg)
    assert sources.local_document_count(DataConfig(name="hf", hf_path="org/data")) is None  # no download to count
    assert sources.local_document_count(DataConfig(max_docs=7)) == 7


def test_cache_dir_env_override_applies_only_to_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("PEGRID_DATA_DIR", str(tmp_path / "shared"))
    assert resolve_cache_dir(DataConfig()) == tmp_path / "shared"
    assert resolve_cache_dir(DataConfig(cache_dir=str(tmp_path / "mine"))) == tmp_path / "mine"
    monkeypatch.delenv("PEGRID_DATA_DIR")
    assert resolve_cache_dir(DataConfig()) == Path.cwd() / "data_cache"


# --- loader ------------------------------------------------------------------------------------


def take(loader: TokenLoader, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(steps)]


def test_loader_batches_are_shifted_windows_of_the_shards(embedded_dir):
    tokens = read_split(embedded_dir, "train").astype(np.int64)
    loader = TokenLoader(embedded_dir, "train", batch_size=4, block_size=64, seed=0)
    assert loader.num_tokens == len(tokens) == split_tokens(embedded_dir, "train")
    windows = {(tokens[s : s + 64].tobytes(), tokens[s + 1 : s + 65].tobytes()) for s in range(0, len(tokens) - 64, 64)}
    for x, y in take(loader, 5):
        assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert all((row.tobytes(), target.tobytes()) in windows for row, target in zip(x.numpy(), y.numpy()))


def test_loader_is_deterministic_per_seed(embedded_dir):
    def batches(seed):
        return take(TokenLoader(embedded_dir, "train", batch_size=4, block_size=32, seed=seed), 3)

    same = zip(batches(1), batches(1))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in same)
    assert not torch.equal(batches(1)[0][0], batches(2)[0][0])


def test_loader_epoch_visits_every_window_once(embedded_dir):
    loader = TokenLoader(embedded_dir, "val", batch_size=1, block_size=1024, seed=3)
    windows = loader.windows.num_windows
    seen = [x[0].tolist() for x, _ in take(loader, windows)]
    tokens = read_split(embedded_dir, "val").tolist()
    assert sorted(seen) == sorted(tokens[i * 1024 : (i + 1) * 1024] for i in range(windows))
    assert loader.state_dict() == {"epoch": 1, "position": 0}


def test_loader_state_dict_restores_exactly_across_epochs(embedded_dir):
    def make():
        return TokenLoader(embedded_dir, "train", batch_size=16, block_size=512, seed=7)

    reference = make()
    expected = take(reference, 40)  # ~15 steps per epoch: crosses two epoch boundaries
    interrupted = make()
    take(interrupted, 13)
    state = json.loads(json.dumps(interrupted.state_dict()))
    restored = make()
    restored.load_state_dict(state)
    for (x, y), (ex, ey) in zip(take(restored, 27), expected[13:]):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_two_ranks_together_see_the_single_process_batch(embedded_dir):
    single = TokenLoader(embedded_dir, "train", batch_size=8, block_size=256, seed=5)
    ranks = [TokenLoader(embedded_dir, "train", batch_size=4, block_size=256, seed=5, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(70):  # ~61 steps per epoch
        x, y = single.next_batch()
        (x0, y0), (x1, y1) = (loader.next_batch() for loader in ranks)
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_tiny_corpus_wraps_epochs_inside_a_batch_or_says_what_is_missing(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("One small document.\n\nAnother one.\n\nA third, held out.\n")
    shard_dir = prepare(DataConfig(name="text_file", path=str(corpus), cache_dir=str(tmp_path), val_fraction=0.34))
    assert split_tokens(shard_dir, "train") < 16
    x, y = TokenLoader(shard_dir, "train", batch_size=8, block_size=4, seed=0).next_batch()
    assert x.shape == (8, 4) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match=r"train split .* has \d+ tokens, but block_size=64 needs at least 65"):
        TokenLoader(shard_dir, "train", batch_size=8, block_size=64, seed=0)


# --- configs and CLI ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SOURCES)
def test_each_data_config_composes_to_the_schema(name):
    """Every registered source has its conf/data/<name>.yaml."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        # the values these sources cannot do without (the schema refuses them empty)
        required = {"text_file": ["data.path=corpus.txt"], "hf": ["data.hf_path=json"]}.get(name, [])
        cfg = compose(config_name="prepare", overrides=[f"data={name}", *required])
    data = OmegaConf.to_object(cfg.data)
    assert isinstance(data, DataConfig) and data.name == name
    if name == "fineweb_edu":
        assert data.streaming and data.val_tokens == data.shard_tokens == 100_000_000


def test_config_typo_fails_at_compose_naming_the_key():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        with pytest.raises(ConfigCompositionException) as error:
            compose(config_name="prepare", overrides=["data=text_file", "data.val_fractoin=0.2"])
        assert "val_fractoin" in str(error.value) + str(error.value.__cause__)
        with pytest.raises(ConfigCompositionException):
            compose(config_name="prepare", overrides=["data.shard_tokens=many"])


def test_ensure_prepared_accepts_the_composed_node(embedded_dir):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="prepare", overrides=[f"data.cache_dir={embedded_dir.parent}"])
    assert ensure_prepared(cfg.data) == embedded_dir


def test_prepare_cli_runs_without_littering_the_cwd(tmp_path):
    corpus = tmp_path / "corpus.txt"
    write_paragraphs(corpus, 30)
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "src.data.prepare", "data=text_file", f"data.path={corpus}",
               f"data.cache_dir={cache}", "data.shard_tokens=200"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    [shard_dir] = cache.iterdir()
    assert f"shards: {shard_dir}" in result.stdout and "train: " in result.stdout and "val: " in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "corpus.txt"]
    assert "Warning" not in result.stderr
