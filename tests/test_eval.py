"""Evaluation suite: configs, val loss, extrapolation, HellaSwag (vs. an independent scorer), the CLI."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from src.checkpoint import save_checkpoint
from src.data import get_tokenizer
from src.eval import (
    EvalConfig,
    HellaSwagUnavailableError,
    eval_config,
    evaluate_extrapolation,
    evaluate_hellaswag,
    evaluate_loss,
    run_evaluation,
    val_tokens,
)
from src.eval.__main__ import RunConfigError, run_config
from src.eval.config import ExtrapolationConfig, HellaSwagConfig
from src.eval.hellaswag import load_examples, predict, score_items
from src.metrics import (
    HELLASWAG_ACC,
    HELLASWAG_ACC_NORM,
    HELLASWAG_N,
    VAL_LOSS,
    extrapolation_context_key,
    extrapolation_loss_key,
)
from src.model import build_model
from tests.conftest import PES, tiny_model_cfg

ROOT = Path(__file__).resolve().parents[1]
GPT2_VOCAB = 50304  # HellaSwag feeds real GPT-2 ids (up to 50256)

HELLASWAG_ITEMS = [
    ("A man is standing on a ladder. He", ["paints the wall.", "eats a sandwich quickly while singing.",
                                           "falls.", "climbs up to the roof of the house."], 0),
    ("The cat jumps onto the table and", ["knocks over a glass.", "sleeps.", "reads the newspaper aloud.",
                                          "starts to purr loudly."], 3),
    ("Two kids play in the snow.", ["They build a snowman.", "They swim.", "One throws a snowball at the other.",
                                    "They go inside"], 2),
    # longer than the tiny model's block_size of 32 tokens: truncated from the left
    ("A woman is in a kitchen preparing a large meal for her family, chopping onions, carrots and celery on a "
     "wooden board while a pot of water slowly comes to a boil on the stove behind her. She",
     ["adds the vegetables to the pot and stirs them with a long wooden spoon.", "laughs.",
      "puts on her running shoes and leaves the house.", "turns off the stove."], 0),
    ("A dog runs across the park", ["chasing a ball.", "and flies away.", "to its owner, wagging its tail.",
                                    "backwards."], 1),
]


def write_hellaswag(path: Path) -> Path:
    """A file in the official hellaswag_val.jsonl format (extra fields included)."""
    with open(path, "w") as f:
        for i, (ctx, endings, label) in enumerate(HELLASWAG_ITEMS):
            f.write(json.dumps({"ind": i, "activity_label": "test", "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                                "endings": endings, "source_id": f"test~{i}", "split": "val",
                                "split_type": "indomain", "label": label}) + "\n")
    return path


@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory) -> Path:
    return write_hellaswag(tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl")


def gpt2_vocab_model(pe: str, attention: str = "regular"):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(pe, attention, vocab_size=GPT2_VOCAB))
    with torch.no_grad():  # large embeddings: confident, well-separated predictions, so no near-ties
        model.wte.weight.normal_(0.0, 1.0)
    return model


def reference_predictions(model, items) -> list[tuple[int, int]]:
    """build-nanogpt's scoring, one unpadded sequence at a time: (argmin summed loss, argmin mean loss)."""
    enc = get_tokenizer()
    predictions = []
    with torch.no_grad():
        for ctx, endings, _ in items:
            sums, means = [], []
            for ending in endings:
                ctx_tokens, end_tokens = enc.encode(ctx), enc.encode(" " + ending)
                seq = (ctx_tokens + end_tokens)[-(model.max_context or 10**9):]
                x = torch.tensor(seq)
                losses = F.cross_entropy(model(x[None])[0, :-1], x[1:], reduction="none")
                losses = losses[-min(len(end_tokens), len(seq) - 1):]
                sums.append(losses.sum().item())
                means.append(losses.mean().item())
            predictions.append((int(np.argmin(sums)), int(np.argmin(means))))
    return predictions


def write_val_shard(shard_dir: Path, tokens: np.ndarray) -> Path:
    shard_dir.mkdir(parents=True, exist_ok=True)
    tokens.astype(np.uint16).tofile(shard_dir / "val_000000.bin")
    return shard_dir


@pytest.fixture(scope="module")
def random_shards(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    shard_dir = write_val_shard(tmp_path_factory.mktemp("shards"), rng.integers(0, 97, 1500))
    (shard_dir / "val_000001.bin").write_bytes(rng.integers(0, 97, 500).astype(np.uint16).tobytes())
    return shard_dir


# --- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "eval").glob("*.yaml")))
def test_each_eval_config_composes_to_the_schema(name):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="evaluate", overrides=[f"eval={name}", "ckpt=somewhere"])
    typed = eval_config(cfg.eval)
    assert isinstance(typed, EvalConfig) and typed.val.num_tokens > 0
    assert all(m >= 1 for m in typed.extrapolation.multipliers)
    assert typed.hellaswag.url.endswith("rowanz/hellaswag/master/data/hellaswag_val.jsonl")


def test_eval_config_typo_fails_at_compose_naming_the_key():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        with pytest.raises(ConfigCompositionException, match="num_tokns"):
            compose(config_name="evaluate", overrides=["ckpt=x", "eval.val.num_tokns=1000"])
        with pytest.raises(ConfigCompositionException, match="num_tokens"):
            compose(config_name="evaluate", overrides=["ckpt=x", "eval.val.num_tokens=many"])
        with pytest.raises(ConfigCompositionException, match="limt"):
            compose(config_name="evaluate", overrides=["ckpt=x", "eval=quick", "eval.hellaswag.limt=5"])


# --- validation loss ---------------------------------------------------------------------------


def test_val_tokens_concatenates_shards_in_order(random_shards):
    tokens = val_tokens(random_shards)
    assert len(tokens) == 2000
    assert np.array_equal(tokens[1500:], np.fromfile(random_shards / "val_000001.bin", dtype=np.uint16))


def test_val_loss_is_the_deterministic_mean_over_fixed_windows(random_shards):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg("rope", "regular")).train()
    tokens = val_tokens(random_shards)
    losses = [evaluate_loss(model, tokens, 32, 1000, batch_size, "cpu") for batch_size in (1, 4, 4)]
    assert model.training  # the previous mode is restored
    assert losses[1] == losses[2]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    model.eval()
    with torch.no_grad():  # by hand: windows i*32 .. i*32+33 inside the first 1000 tokens
        windows = [torch.from_numpy(tokens[i * 32 : i * 32 + 33].astype(np.int64)) for i in range(999 // 32)]
        expected = np.mean([model(w[None, :-1], w[None, 1:])[1].item() for w in windows])
    assert losses[1] == pytest.approx(expected, rel=1e-5)


def test_val_loss_errors_clearly_when_the_split_is_shorter_than_a_window(tmp_path):
    tokens = val_tokens(write_val_shard(tmp_path, np.arange(20)))
    model = build_model(tiny_model_cfg("rope", "regular"))
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluate_loss(model, tokens, 32, 10_000, 4, "cpu")


# --- extrapolation -----------------------------------------------------------------------------


@pytest.mark.parametrize("pe", PES)
def test_extrapolation_to_twice_the_context(pe, random_shards):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(pe, "regular"))
    cfg = ExtrapolationConfig(multipliers=[1, 2], num_tokens=1000, batch_size=4)
    results = evaluate_extrapolation(model, val_tokens(random_shards), cfg, "cpu")
    assert results[extrapolation_context_key(1)] == 32 and results[extrapolation_context_key(2)] == 64
    assert math.isfinite(results[extrapolation_loss_key(1)])
    if pe == "learned":  # learned absolute positions stop at block_size: not applicable
        assert results[extrapolation_loss_key(2)] is None
    else:
        assert math.isfinite(results[extrapolation_loss_key(2)])


def test_extrapolation_beyond_the_val_split_is_none_with_a_warning(tmp_path, caplog):
    model = build_model(tiny_model_cfg("alibi", "linformer"))
    tokens = val_tokens(write_val_shard(tmp_path, np.arange(100) % 97))
    results = evaluate_extrapolation(model, tokens, ExtrapolationConfig(multipliers=[1, 2, 4]), "cpu")
    assert results[extrapolation_loss_key(2)] is not None  # 64 + 1 tokens fit in 100
    assert results[extrapolation_loss_key(4)] is None
    assert "extrapolation x4 skipped" in caplog.text


# --- HellaSwag ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pe,attention", [("learned", "regular"), ("rope", "flash"), ("alibi", "linformer")])
def test_hellaswag_choices_match_an_independent_one_sequence_scorer(pe, attention, hellaswag_file):
    model = gpt2_vocab_model(pe, attention).eval()
    examples = load_examples(hellaswag_file)
    expected = reference_predictions(model, HELLASWAG_ITEMS)
    with torch.no_grad():  # all items padded into one batch
        pred, pred_norm = predict(model, examples)
    assert list(zip(pred.tolist(), pred_norm.tolist())) == expected
    labels = [label for _, _, label in HELLASWAG_ITEMS]
    for batch_size in (1, 2, 5):
        correct, correct_norm, n = score_items(model, examples, batch_size=batch_size)
        assert n == len(HELLASWAG_ITEMS)
        assert correct == sum(p == y for (p, _), y in zip(expected, labels))
        assert correct_norm == sum(p == y for (_, p), y in zip(expected, labels))


def test_hellaswag_sums_losses_over_the_ending_tokens_only(hellaswag_file):
    model = gpt2_vocab_model("rope").eval()
    predictions = reference_predictions(model, HELLASWAG_ITEMS)
    assert any(p != p_norm for p, p_norm in predictions), "acc and acc_norm should differ on these items"


def test_hellaswag_limit_and_result_keys(hellaswag_file):
    model = gpt2_vocab_model("learned")
    results = evaluate_hellaswag(model, HellaSwagConfig(path=str(hellaswag_file), limit=2), "cpu")
    assert results[HELLASWAG_N] == 2
    expected = reference_predictions(model, HELLASWAG_ITEMS[:2])
    labels = [label for _, _, label in HELLASWAG_ITEMS[:2]]
    assert results[HELLASWAG_ACC] == sum(p == y for (p, _), y in zip(expected, labels)) / 2
    assert results[HELLASWAG_ACC_NORM] == sum(p == y for (_, p), y in zip(expected, labels)) / 2


def test_hellaswag_ranks_share_the_items_without_overlap(hellaswag_file):
    model = gpt2_vocab_model("rope")
    examples = load_examples(hellaswag_file)
    single = score_items(model, examples, batch_size=2)
    shards = [score_items(model, examples, rank=rank, world_size=3, batch_size=2) for rank in range(3)]
    assert [n for _, _, n in shards] == [2, 2, 1]  # items 0,3 / 1,4 / 2
    assert tuple(map(sum, zip(*shards))) == single


def test_hellaswag_offline_fails_fast_naming_the_fix(tmp_path):
    cfg = HellaSwagConfig(cache_dir=str(tmp_path / "cache"), url="http://127.0.0.1:9/nothing.jsonl")
    started = time.monotonic()
    with pytest.raises(HellaSwagUnavailableError) as excinfo:
        evaluate_hellaswag(gpt2_vocab_model("rope"), cfg, "cpu")
    assert time.monotonic() - started < 15
    message = str(excinfo.value)
    assert "http://127.0.0.1:9/nothing.jsonl" in message and "eval.hellaswag.path" in message
    assert "eval.hellaswag.enabled=false" in message and "\n" not in message
    assert list((tmp_path / "cache").iterdir()) == []  # no partial download left behind
    with pytest.raises(HellaSwagUnavailableError, match="eval.hellaswag.path"):
        evaluate_hellaswag(gpt2_vocab_model("rope"), HellaSwagConfig(path=str(tmp_path / "missing.jsonl")), "cpu")


def test_hellaswag_rejects_a_file_that_is_not_hellaswag(tmp_path):
    bad = tmp_path / "hellaswag_val.jsonl"
    bad.write_text("<html>captive portal</html>\n")
    with pytest.raises(HellaSwagUnavailableError, match="line 1"):
        load_examples(bad)


# --- suite and CLI -----------------------------------------------------------------------------


def test_run_evaluation_reports_the_contract_keys(random_shards):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg("fire", "regular"))
    cfg = {"val": {"num_tokens": 500}, "extrapolation": {"multipliers": [1, 2], "num_tokens": 500},
           "hellaswag": {"enabled": False}}
    results = run_evaluation(model, OmegaConf.create(cfg), random_shards, "cpu")
    assert set(results) == {VAL_LOSS, "extrapolation/loss_x1", "extrapolation/loss_x2",
                            "extrapolation/context_x1", "extrapolation/context_x2"}
    assert results[VAL_LOSS] == pytest.approx(results["extrapolation/loss_x1"], rel=1e-5)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny training run as the trainer leaves it: config.yaml, checkpoints/step_*/, summary.json."""
    tmp = tmp_path_factory.mktemp("run")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox number {i} jumps over the lazy dog."
                                  for i in range(100)))
    data = {"name": "text_file", "path": str(corpus), "cache_dir": str(tmp / "data_cache"), "val_fraction": 0.1,
            "shard_tokens": 100_000, "num_proc": 1}
    model_cfg = tiny_model_cfg("learned", "regular", vocab_size=GPT2_VOCAB)
    run = tmp / "run"
    run.mkdir()
    OmegaConf.save(OmegaConf.create({"data": data, "model": model_cfg}), run / "config.yaml")
    torch.manual_seed(0)
    save_checkpoint(run / "checkpoints", 10, build_model(model_cfg), model_cfg, {"step": 10}, keep_last=2)
    (run / "summary.json").write_text(json.dumps({"train/loss": 3.5, "val/loss": 9.9}))
    return run


def run_cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "src.eval", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", ["run dir", "checkpoint dir"])
def test_cli_evaluates_a_run_and_merges_the_summary(ckpt, run_dir, hellaswag_file, tmp_path):
    path = run_dir if ckpt == "run dir" else run_dir / "checkpoints" / "step_00000010"
    proc = run_cli(f"ckpt={path}", "eval=quick", f"eval.hellaswag.path={hellaswag_file}", "device=cpu",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing littered in the cwd
    results = json.loads((run_dir / "checkpoints" / "step_00000010" / "eval.json").read_text())
    assert math.isfinite(results[VAL_LOSS]) and results[HELLASWAG_N] == len(HELLASWAG_ITEMS)
    assert results["extrapolation/loss_x1"] is not None and results["extrapolation/loss_x2"] is None
    assert results["extrapolation/context_x4"] == 128
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == {"train/loss": 3.5, **results}  # old keys kept, val/loss replaced
    assert results["eval/preset"] == "quick" and results["eval/checkpoint"] == "step_00000010"
    assert "val/loss" in proc.stdout and "hellaswag/acc_norm" in proc.stdout


@pytest.mark.slow
def test_cli_bad_checkpoint_path_is_one_line_and_exit_code_2(tmp_path):
    proc = run_cli(f"ckpt={tmp_path / 'nope'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: no checkpoint at")


def test_cli_needs_the_run_config_for_the_val_split(tmp_path):
    with pytest.raises(RunConfigError, match="config.yaml not found"):
        run_config(tmp_path)
