"""The byte-level tokenizer (`data.tokenizer=bytes`): ids, the model's vocab_size following it, shards that
record it and are never reused across tokenizers, and evaluation, chat and export with a byte model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from src.chat.generate import Conversation, SamplingConfig, decode_stream, generate_tokens
from src.chat.store import ModelLoadError, load
from src.chat.terminal import main as chat_main
from src.checkpoint import save_checkpoint
from src.data import DataConfig, prepare
from src.data.prepare import dataset_dir
from src.data.tokenizer import check_vocab_fits, get_tokenizer, padded_vocab_size
from src.eval.suite import check_tokenizer, run_evaluation
from src.export import export
from src.model import build_model
from tests.conftest import ROOT, tiny_model_cfg
from tests.train_helpers import compose_train

TEXT = "Größe: 犬 🦜 — plain ASCII too.\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the tokenizer -----------------------------------------------------------------------------


def test_byte_ids_are_the_utf8_bytes_and_decode_exactly():
    enc = get_tokenizer("bytes")
    assert (enc.name, enc.n_vocab, enc.eot_token) == ("bytes", 256, 0)
    ids = enc.encode_ordinary(TEXT)
    assert ids == list(TEXT.encode("utf-8")) and max(ids) < 256
    assert enc.decode(ids) == TEXT
    assert enc.decode(ids[:3]) == "Gr\ufffd"  # half of "ö": replaced, not an exception


def test_gpt2_stays_the_default_and_names_are_checked():
    assert get_tokenizer() is get_tokenizer("gpt2")
    assert get_tokenizer().n_vocab == 50257
    with pytest.raises(ValueError, match="unknown tokenizer 'byte'.*gpt2, bytes"):
        get_tokenizer("byte")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        DataConfig(tokenizer="byte")


def test_model_vocab_size_follows_data_tokenizer():
    assert (padded_vocab_size("gpt2"), padded_vocab_size("bytes")) == (50304, 256)
    for model in ("tiny", "small", "gpt2"):
        assert compose_train([f"model={model}"]).model.vocab_size == 50304
        assert compose_train([f"model={model}", "data.tokenizer=bytes"]).model.vocab_size == 256
    assert compose_train(["data.tokenizer=bytes", "model.vocab_size=512"]).model.vocab_size == 512


def test_a_model_too_small_for_the_tokenizer_is_one_line():
    check_vocab_fits(256, "bytes")
    check_vocab_fits(50304, "bytes")  # a larger vocabulary is only padding
    with pytest.raises(ValueError, match=r"model.vocab_size=256 cannot hold the gpt2 tokenizer's 50257 ids") as err:
        check_vocab_fits(256, "gpt2")
    assert "\n" not in str(err.value)


# --- shards ------------------------------------------------------------------------------------


def corpus_config(tmp_path: Path, tokenizer: str) -> DataConfig:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("\n\n".join(f"Paragraph {i}: {TEXT}" for i in range(20)))
    return DataConfig(name="text_file", path=str(corpus), cache_dir=str(tmp_path / "cache"), tokenizer=tokenizer,
                      val_fraction=0.2)


def test_byte_shards_record_their_tokenizer_and_hold_the_documents(tmp_path):
    shard_dir = prepare(corpus_config(tmp_path, "bytes"))
    meta = json.loads((shard_dir / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == ("bytes", 256, 0)
    assert meta["layout"]["tokenizer"] == "bytes"
    train = np.fromfile(shard_dir / "train_000000.bin", dtype=np.uint16)
    starts = np.flatnonzero(train == 0).tolist() + [len(train)]
    documents = [get_tokenizer("bytes").decode(train[a + 1 : b].tolist()) for a, b in zip(starts, starts[1:])]
    assert documents == [f"Paragraph {i}: {TEXT}".strip() for i in range(16)]


def test_shards_of_another_tokenizer_are_never_reused(tmp_path):
    gpt2_dir, bytes_dir = prepare(corpus_config(tmp_path, "gpt2")), prepare(corpus_config(tmp_path, "bytes"))
    assert gpt2_dir != bytes_dir  # the tokenizer is part of the dataset key
    assert json.loads((gpt2_dir / "meta.json").read_text())["tokenizer"] == "gpt2"
    assert np.fromfile(gpt2_dir / "train_000000.bin", dtype=np.uint16).max() > 255
    # GPT-2 shards copied in under the bytes key (a hand-made cache) are refused, not read as bytes
    shutil.rmtree(bytes_dir)
    shutil.copytree(gpt2_dir, bytes_dir)
    with pytest.raises(ValueError, match="holds gpt2 tokens, not data.tokenizer=bytes"):
        prepare(corpus_config(tmp_path, "bytes"))
    assert dataset_dir(corpus_config(tmp_path, "bytes")) == bytes_dir


# --- evaluation --------------------------------------------------------------------------------


def byte_model_cfg(pe: str = "alibi") -> dict:
    return tiny_model_cfg(pe, "regular", vocab_size=256)


def test_evaluation_of_a_byte_model_and_hellaswag_needs_gpt2(tmp_path):
    shard_dir = prepare(corpus_config(tmp_path, "bytes"))
    model = build_model(byte_model_cfg())
    cfg = {"val": {"num_tokens": 200}, "extrapolation": {"multipliers": [1, 2], "num_tokens": 200},
           "hellaswag": {"enabled": False}}
    results = run_evaluation(model, OmegaConf.create(cfg), shard_dir, "cpu")
    assert np.isfinite(results["val/loss"]) and results["extrapolation/loss_x2"] is not None
    check_tokenizer({"hellaswag": {"enabled": True}}, "gpt2")
    check_tokenizer({"hellaswag": {"enabled": False}}, "bytes")
    cfg["hellaswag"] = {"enabled": True, "path": str(tmp_path / "never-read.jsonl")}
    with pytest.raises(ValueError, match=r"HellaSwag needs the GPT-2 BPE tokenizer .* data.tokenizer=bytes") as err:
        run_evaluation(model, OmegaConf.create(cfg), shard_dir, "cpu")
    assert "\n" not in str(err.value)


# --- chat and export ---------------------------------------------------------------------------


def byte_run(run_dir: Path, tokenizer: str = "bytes") -> Path:
    """A run dir as training leaves it, with an untrained byte model and the config naming its tokenizer."""
    cfg = byte_model_cfg()
    torch.manual_seed(0)
    save_checkpoint(run_dir / "checkpoints", 1, build_model(cfg), cfg, {}, keep_last=1)
    OmegaConf.save(OmegaConf.create({"data": {"name": "embedded", "tokenizer": tokenizer}, "model": cfg}),
                   run_dir / "config.yaml")
    (run_dir / "summary.json").write_text(json.dumps({"pe": "alibi", "attention": "regular", "step": 1}))
    return run_dir


def test_byte_conversation_starts_with_byte_zero_and_stops_there():
    conversation = Conversation(window=64, tokenizer="bytes")
    assert conversation.tokens == [0]
    conversation.add_message("Hi")
    assert conversation.tokens == [0, *b"Hi"]

    class ScriptedLM:  # greedy answer "ok", then EOT
        config = type("Config", (), {"block_size": 64})()
        max_context = None
        script = [ord("o"), ord("k"), 0]

        def parameters(self):
            yield torch.zeros(1)

        def new_kv_cache(self):
            return type("Cache", (), {"length": 0})()

        def __call__(self, idx, kv_cache=None):
            logits = torch.zeros(1, idx.size(1), 256)
            logits[0, -1, self.script.pop(0)] = 1.0
            return logits

    assert list(generate_tokens(ScriptedLM(), conversation, SamplingConfig(temperature=0))) == [ord("o"), ord("k")]
    assert conversation.tokens[-1] == 0


def test_streamed_bytes_never_split_a_character_and_bad_bytes_do_not_crash():
    ids = list(TEXT.encode("utf-8"))
    pieces = list(decode_stream(ids, "bytes"))
    assert "".join(pieces) == TEXT and not any("\ufffd" in p for p in pieces) and "犬" in pieces
    assert "".join(decode_stream([0xE7, 0x8A, ord("a"), 0xFF], "bytes")) == "\ufffda\ufffd"


def test_chat_and_export_of_a_byte_model(tmp_path, capsys):
    run = byte_run(tmp_path / "alibi-regular")
    loaded = load(str(run))
    assert loaded.tokenizer == "bytes"
    assert load(str(run / "checkpoints" / "step_00000001")).tokenizer == "bytes"  # via the run's config.yaml
    argv = ["--model", str(run), "--prompt", "Hello", "--temperature", "1.0", "--seed", "0", "--max-new-tokens", "40"]
    assert chat_main(argv) == 0
    out = capsys.readouterr()
    assert "tokenizer=bytes" in out.err and out.out.endswith("\n")
    out_dir = export(run, tmp_path / "export").folder
    assert load(str(out_dir)).tokenizer == "bytes"
    card = (out_dir / "README.md").read_text()
    assert "UTF-8 bytes (256 ids" in card and "GPT-2 BPE" not in card
    assert chat_main(["--model", str(out_dir), "--prompt", "Hi", "--max-new-tokens", "5"]) == 0


def test_a_run_whose_config_names_another_tokenizer_is_refused_in_one_line(tmp_path):
    run = byte_run(tmp_path / "run", tokenizer="gpt2")  # a 256-row model cannot read GPT-2 ids
    with pytest.raises(ModelLoadError, match="cannot hold the gpt2 tokenizer's 50257 ids") as err:
        load(str(run))
    assert "\n" not in str(err.value)


def test_the_chat_page_answers_with_a_byte_model(tmp_path, monkeypatch):
    """The page builds its conversation with the model's tokenizer: GPT-2's EOT (50256) would index past a
    256-row byte model."""
    from streamlit.testing.v1 import AppTest

    byte_run(tmp_path / "alibi-regular")
    monkeypatch.setenv("PEGRID_MODELS_ROOT", str(tmp_path))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    at.chat_input[0].set_value("Hello").run()
    assert not at.exception
    assert len(at.chat_message) == 2  # the prompt and an answer
