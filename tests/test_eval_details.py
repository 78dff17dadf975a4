"""Loss by position, sliding-window evaluation, what each PE learned (eval_details.json), inference-time PE
variants (python -m src.eval +model.pe.*=...): each number against an independent computation."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from src.atomic import atomic_write_json
from src.checkpoint import load_model, pe_variant, save_checkpoint
from src.errors import ConfigError
from src.eval.config import DetailsConfig, ExtrapolationConfig
from src.eval.details import attention_statistics, bias_by_distance, evaluation_details
from src.eval.extrapolation import evaluate_extrapolation_by_position
from src.eval.suite import evaluate_suite
from src.eval.val_loss import evaluate_loss, loss_by_position, sliding_windows
from src.metrics import EXTRAPOLATION_STRIDE, PE_VARIANT, VAL_LOSS, extrapolation_loss_key, sliding_loss_key
from src.model import ATTENTION_REGISTRY, build_model
from src.model.pe.alibi import alibi_slopes
from tests.conftest import tiny_model_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
T = 32  # tiny_model_cfg's block_size


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 97, 1200).astype(np.uint16)


def tiny(pe: str, attention: str = "regular", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_model_cfg(pe, attention)).eval()


def next_token_loss(model, context: np.ndarray, target: int) -> float:
    """The loss of one prediction, computed alone: the model reads `context`, predicts `target`."""
    with torch.no_grad():
        logits = model(torch.from_numpy(context.astype(np.int64))[None])
    return F.cross_entropy(logits[0, -1:].float(), torch.tensor([target])).item()


# ---------------------------------------------------------------------------------------------- loss by position
def test_losses_by_position_are_the_per_token_losses_and_average_to_the_window_loss(tokens):
    model = tiny("alibi")
    num_windows, context_len = 5, 16
    losses = loss_by_position(model, tokens, context_len, num_windows * context_len + 1, 2, "cpu")
    assert losses.count.tolist() == [num_windows] * context_len
    for p in (0, 7, 15):  # position p of window w predicts token w·L + p + 1 from the w·L … w·L + p before it
        expected = np.mean([next_token_loss(model, tokens[w * context_len : w * context_len + p + 1],
                                            int(tokens[w * context_len + p + 1])) for w in range(num_windows)])
        assert losses.by_position()[p] == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():  # the mean of the model's own loss over the same windows
        windows = torch.from_numpy(np.stack([tokens[w * context_len : (w + 1) * context_len + 1]
                                             for w in range(num_windows)]).astype(np.int64))
        _, window_loss = model(windows[:, :-1], windows[:, 1:])
    assert np.average(losses.by_position(), weights=losses.count) == pytest.approx(window_loss.item(), rel=1e-6)
    assert losses.mean == pytest.approx(window_loss.item(), rel=1e-6)


def test_the_extrapolation_pass_returns_its_losses_by_position(tokens):
    model = tiny("rope")
    cfg = ExtrapolationConfig(multipliers=[1, 2], num_tokens=600, batch_size=4)
    metrics, by_position = evaluate_extrapolation_by_position(model, tokens, cfg, "cpu")
    assert sorted(by_position) == [1, 2] and len(by_position[2].total) == 2 * T
    for m in (1, 2):
        assert by_position[m].mean == metrics[extrapolation_loss_key(m)]


# ---------------------------------------------------------------------------------------------- sliding windows
@pytest.mark.parametrize(("num_targets", "context_len", "stride"), [(96, 32, 32), (96, 32, 8), (100, 32, 8),
                                                                    (33, 32, 1), (64, 16, 5), (32, 32, 4)])
def test_sliding_windows_predict_every_token_once_with_enough_context(num_targets, context_len, stride):
    starts, first_scored = sliding_windows(num_targets, context_len, stride)
    predicted = [start + p + 1 for start, first in zip(starts, first_scored) for p in range(first, context_len)]
    assert sorted(predicted) == list(range(1, num_targets + 1))  # each of the tokens 1 … N exactly once
    assert all(start >= 0 and start + context_len <= num_targets for start in starts)  # inside the scored tokens
    assert all(first >= context_len - stride for first in first_scored[1:])  # >= L − stride tokens of context


def test_a_stride_equal_to_the_context_reproduces_the_non_overlapping_loss(tokens):
    model = tiny("fire")
    plain = loss_by_position(model, tokens, T, 1000, 4, "cpu")
    sliding = loss_by_position(model, tokens, T, 1000, 4, "cpu", stride=T)
    assert np.array_equal(plain.total, sliding.total) and np.array_equal(plain.count, sliding.count)


@pytest.mark.parametrize("pe", ["alibi", "rope"])
def test_sliding_window_loss_matches_scoring_each_token_alone(pe, tokens):
    model = tiny(pe)
    # 3 non-overlapping windows' tokens, the same the sliding layout predicts
    context_len, stride, num_targets = 16, 4, 48
    got = loss_by_position(model, tokens, context_len, num_targets + 1, 3, "cpu", stride=stride).mean

    def context_of(t: int) -> int:  # the layout by definition: the first window, then `stride` new tokens each
        return t if t <= context_len else context_len - stride + (t - context_len - 1) % stride + 1

    expected = np.mean([next_token_loss(model, tokens[t - context_of(t) : t], int(tokens[t]))
                        for t in range(1, num_targets + 1)])
    assert got == pytest.approx(expected, rel=1e-5)


def test_sliding_losses_are_reported_beside_the_non_overlapping_ones(tokens):
    model = tiny("kerple")
    cfg = ExtrapolationConfig(multipliers=[1, 2], num_tokens=600, batch_size=4, stride=8)
    metrics, _ = evaluate_extrapolation_by_position(model, tokens, cfg, "cpu")
    assert metrics[EXTRAPOLATION_STRIDE] == 8
    for m in (1, 2):
        assert metrics[sliding_loss_key(m)] == pytest.approx(
            loss_by_position(model, tokens, m * T, 600, 4, "cpu", stride=8).mean, rel=1e-9)
        assert metrics[sliding_loss_key(m)] != metrics[extrapolation_loss_key(m)]


def test_a_stride_longer_than_the_shortest_context_is_a_config_error(tokens):
    cfg = ExtrapolationConfig(multipliers=[2, 4], stride=65)
    with pytest.raises(ConfigError, match=r"eval.extrapolation.stride=65 exceeds .* 64 tokens"):
        evaluate_extrapolation_by_position(tiny("alibi"), tokens, cfg, "cpu")
    with pytest.raises(ConfigError, match="eval.extrapolation.stride must be positive"):
        ExtrapolationConfig(stride=0)


# ---------------------------------------------------------------------------------------------- what each PE learned
def test_alibi_bias_by_distance_is_minus_slope_times_distance():
    model = tiny("alibi")
    section = bias_by_distance(model, multiplier=4)
    assert section["query_position"] == 4 * T - 1 and section["distance"] == list(range(4 * T))
    assert sorted(section["layers"]) == ["0", "1"]  # the first and the last of 2 layers
    distance = np.arange(4 * T)
    for head, slope in enumerate(alibi_slopes(4)):
        np.testing.assert_allclose(section["layers"]["1"][head], -slope * distance, rtol=1e-6)


def test_learned_biases_differ_per_layer_and_pes_without_a_bias_have_none():
    model = tiny("kerple")
    with torch.no_grad():
        model.h[1].attn.pe.r1.mul_(2)  # make the last layer's kernel differ from the first's
    layers = bias_by_distance(model, 4)["layers"]
    assert layers["0"] != layers["1"]
    assert bias_by_distance(tiny("rope"), 4) is None and bias_by_distance(tiny("learned"), 4) is None


def test_fire_bias_is_read_for_the_query_at_the_end_of_the_window():
    model = tiny("fire")
    section = bias_by_distance(model, 2)
    pe = model.h[0].attn.pe
    q, k = torch.tensor([2 * T - 1.0]), torch.tensor([2 * T - 1.0 - 5])
    assert section["layers"]["0"][2][5] == pytest.approx(pe.bias_matrix(q, k)[2, 0, 0].item(), rel=1e-6)


@pytest.mark.parametrize("attention", ["regular", "flash"])
def test_uniform_attention_has_the_entropy_and_distance_of_a_uniform_choice(attention, tokens):
    """NoPE with zero query weights: every query i attends uniformly to its i + 1 keys, so the entropy is
    ln(i + 1) and the mean distance i / 2, averaged over the queries."""
    model = tiny("nope", attention)
    with torch.no_grad():
        for block in model.h:
            block.attn.c_attn.weight[: model.config.n_embd].zero_()
            block.attn.c_attn.bias[: model.config.n_embd].zero_()
    stats = attention_statistics(model, tokens, 2 * T, 3, "cpu")
    i = np.arange(2 * T)
    assert stats["context"] == 2 * T and stats["windows"] == 3
    np.testing.assert_allclose(stats["entropy"], np.full((2, 4), np.log(i + 1).mean()), rtol=1e-5)
    np.testing.assert_allclose(stats["mean_distance"], np.full((2, 4), (i / 2).mean()), rtol=1e-5)


@pytest.mark.parametrize("attention", ATTENTION_REGISTRY.names())
@pytest.mark.parametrize("pe", ["alibi", "rope"])
def test_attention_weights_are_causal_distributions(attention, pe):
    model = tiny(pe, attention)
    captured = []

    def hook(mechanism, args):
        q, k, v, q_pos, k_pos, layer_pe = args
        captured.append((mechanism.attention_weights(q, k, v, q_pos, k_pos, layer_pe), q_pos))

    handle = model.h[1].attn.mechanism.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(torch.randint(0, 97, (2, T)))
    handle.remove()
    (probs, key_pos), q_pos = captured[0]
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    assert (probs[..., key_pos[None, :] > q_pos[:, None].float()] == 0).all()  # never a later position


@pytest.mark.parametrize("attention", ATTENTION_REGISTRY.names())
def test_attention_weights_are_what_the_forward_applies(attention):
    """Their product with the values the mechanism weighs (Linformer: its slots, then the keys) is its output."""
    model = tiny("alibi", attention)
    mechanism = model.h[0].attn.mechanism
    seen = {}

    def before(module, args):
        q, k, v, q_pos, k_pos, pe = args
        probs, _ = module.attention_weights(q, k, v, q_pos, k_pos, pe)
        values = torch.cat((module._slots(k, v, k_pos[0])[3], v), dim=2) if probs.size(-1) > v.size(-2) else v
        seen["weighted"] = probs @ values.float()

    handles = [mechanism.register_forward_pre_hook(before),
               mechanism.register_forward_hook(lambda module, args, out: seen.setdefault("out", out))]
    with torch.no_grad():
        model(torch.randint(0, 97, (2, T)))
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(seen["weighted"], seen["out"].float(), rtol=1e-5, atol=1e-6)


def test_evaluation_details_hold_every_section(tokens):
    model = tiny("t5_bias")
    cfg = ExtrapolationConfig(multipliers=[1, 2, 4], num_tokens=600, batch_size=4)
    _, by_position = evaluate_extrapolation_by_position(model, tokens, cfg, "cpu")
    details = json.loads(json.dumps(evaluation_details(model, tokens, DetailsConfig(), by_position, "cpu")))
    assert details["block_size"] == T
    assert {m: len(section["loss"]) for m, section in details["loss_by_position"].items()} == {
        "1": T, "2": 2 * T, "4": 4 * T}
    assert len(details["bias_by_distance"]["layers"]["0"]) == 4  # heads
    assert sorted(details["attention"]) == ["1", "4"]
    assert np.array(details["attention"]["4"]["entropy"]).shape == (2, 4)  # layers x heads


def test_a_pe_with_a_position_limit_gets_details_only_where_it_runs(tokens):
    model = tiny("learned")
    cfg = ExtrapolationConfig(multipliers=[1, 2], num_tokens=600, batch_size=4)
    _, by_position = evaluate_extrapolation_by_position(model, tokens, cfg, "cpu")
    details = evaluation_details(model, tokens, DetailsConfig(), by_position, "cpu")
    assert list(details["loss_by_position"]) == ["1"] and list(details["attention"]) == ["1"]
    assert details["bias_by_distance"] is None


def test_the_suite_computes_details_only_when_asked(tmp_path, tokens):
    tokens.tofile(tmp_path / "val_000000.bin")
    cfg = OmegaConf.create({"val": {"num_tokens": 300}, "extrapolation": {"multipliers": [1, 2], "num_tokens": 300},
                            "hellaswag": {"enabled": False}})
    model = tiny("alibi")
    periodic = evaluate_suite(model, cfg, tmp_path, "cpu")
    final = evaluate_suite(model, cfg, tmp_path, "cpu", details=True)
    assert periodic.details is None and final.details is not None
    assert periodic.metrics == final.metrics
    assert final.metrics[VAL_LOSS] == evaluate_loss(model, tokens, T, 300, 8, "cpu")


# ---------------------------------------------------------------------------------------------- the trainer and CLI
def run_module(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def rope_run(tmp_path_factory) -> Path:
    """A tiny trained RoPE run of the CPU study's shape (bytes), as the trainer leaves it."""
    tmp = tmp_path_factory.mktemp("rope_run")
    proc = run_module("src.train", "experiment=study_cpu", "model/pe=rope", "model/attention=regular",
                      "model.n_layer=1", "model.n_embd=32", "model.block_size=32", "trainer.max_steps=20",
                      "trainer.total_batch_tokens=256", "trainer.micro_batch_size=8",
                      "eval.val.num_tokens=4096", "eval.extrapolation.num_tokens=4096",
                      "eval.extrapolation.multipliers=[1,2,4]", "eval.extrapolation.stride=16",
                      f"runs_dir={tmp}", "run_name=rope", f"data.cache_dir={tmp / 'data'}", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "rope"


@pytest.mark.slow
def test_training_writes_the_details_of_its_final_evaluation(rope_run):
    summary = json.loads((rope_run / "summary.json").read_text())
    details = json.loads((rope_run / "eval_details.json").read_text())
    assert summary[EXTRAPOLATION_STRIDE] == 16 and summary[sliding_loss_key(4)] is not None
    for m, section in details["loss_by_position"].items():
        mean = np.average(section["loss"], weights=section["count"])
        assert mean == pytest.approx(summary[extrapolation_loss_key(int(m))], rel=1e-9)


@pytest.mark.slow
def test_cli_records_each_pe_variant_beside_the_run(rope_run, tmp_path):
    before = (rope_run / "summary.json").read_text()
    proc = run_module("src.eval", "-m", f"ckpt={rope_run}", "eval=study_cpu", "eval.val.num_tokens=4096",
                      "eval.extrapolation.num_tokens=4096", "eval.extrapolation.multipliers=[1,2,4]",
                      "eval.extrapolation.stride=16", "device=cpu", "+model.pe.scaling.type=linear,yarn",
                      "+model.pe.scaling.factor=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # nothing littered in the cwd
    assert (rope_run / "summary.json").read_text() == before  # the run's own record is left alone
    plain = json.loads(before)
    for variant, directory in (("linear×4", "linear-x4"), ("yarn×4", "yarn-x4")):
        record = rope_run / "variants" / directory
        summary = json.loads((record / "summary.json").read_text())
        assert summary[PE_VARIANT] == variant and summary["pe"] == "rope" and summary["status"] == "finished"
        assert summary["run_name"] == plain["run_name"] and summary["seed"] == plain["seed"]
        assert summary[VAL_LOSS] != plain[VAL_LOSS]  # a different model at inference
        assert OmegaConf.load(record / "config.yaml").model.pe.scaling.factor == 4
        assert (record / "eval_details.json").is_file() and (record / "eval.json").is_file()
    assert "PE variant yarn×4" in proc.stdout


@pytest.mark.slow
def test_cli_a_scaling_factor_of_one_is_the_plain_evaluation(rope_run, tmp_path):
    proc = run_module("src.eval", f"ckpt={rope_run}", "eval=study_cpu", "eval.val.num_tokens=4096",
                      "eval.extrapolation.num_tokens=4096", "eval.extrapolation.multipliers=[1,2,4]",
                      "eval.extrapolation.stride=16", "device=cpu", "+model.pe.scaling.type=yarn",
                      "+model.pe.scaling.factor=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((rope_run / "summary.json").read_text())
    trained = [json.loads(line) for line in (rope_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary[VAL_LOSS] == pytest.approx(trained[VAL_LOSS], rel=1e-9)  # same windows, same model
    assert not (rope_run / "variants" / "yarn-x1").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("override", "message"), [
    ("+model.pe.scaling.typo=1", "model.pe.scaling.typo=1 does not fit the checkpoint's 'rope' PE"),
    ("+model.pe.scaling.type=foo", "model.pe.scaling.type must be one of"),
])
def test_cli_a_bad_pe_override_is_one_line(rope_run, tmp_path, override, message):
    proc = run_module("src.eval", f"ckpt={rope_run}", "device=cpu", "eval=val_only", override, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


@pytest.mark.slow
def test_train_refuses_a_stride_longer_than_the_context_before_training(tmp_path):
    proc = run_module("src.train", "experiment=study_cpu", "eval.extrapolation.stride=100", f"runs_dir={tmp_path}",
                      cwd=tmp_path)
    assert proc.returncode == 2 and "eval.extrapolation.stride=100 exceeds" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not any(tmp_path.rglob("metrics.jsonl"))


@pytest.mark.parametrize(("overrides", "variant"), [
    ({"base": 500000.0}, "base=500000.0"),  # a setting the PE does not name itself is named by its key
    ({"base": 10000.0}, None),  # RoPE's default: the trained PE
    ({"scaling": {"type": "yarn", "factor": 4}}, "yarn×4"),
    ({"scaling": {"type": "yarn", "factor": 1}}, None),  # plain RoPE, bit for bit
])
def test_a_pe_variant_is_named_against_the_trained_pe(tmp_path, overrides, variant):
    cfg = tiny_model_cfg("rope", "regular")
    save_checkpoint(tmp_path / "checkpoints", 1, build_model(cfg), cfg, {"step": 1}, keep_last=1)
    model, ckpt_dir = load_model(tmp_path, "cpu", overrides)
    assert pe_variant(model, ckpt_dir, overrides) == variant


def test_the_chat_shows_a_variants_own_numbers_never_the_runs(tmp_path):
    from src.chat.store import load

    cfg = tiny_model_cfg("rope", "regular")
    save_checkpoint(tmp_path / "checkpoints", 1, build_model(cfg), cfg, {"step": 1}, keep_last=1)
    atomic_write_json(tmp_path / "summary.json", {"run_name": "r", VAL_LOSS: 2.5, "seed": 0})
    yarn = {"scaling": {"type": "yarn", "factor": 4}}
    assert load(str(tmp_path), "cpu").metrics == {VAL_LOSS: 2.5}
    assert load(str(tmp_path), "cpu", yarn).metrics == {}  # not evaluated as yarn×4: no number at all
    (tmp_path / "variants" / "yarn-x4").mkdir(parents=True)
    atomic_write_json(tmp_path / "variants" / "yarn-x4" / "summary.json", {PE_VARIANT: "yarn×4", VAL_LOSS: 2.75})
    assert load(str(tmp_path), "cpu", yarn).metrics == {VAL_LOSS: 2.75}
    assert load(str(tmp_path), "cpu", {"base": 500000.0}).info["pe"] == "rope+base=500000.0"  # not "rope"


def test_chat_takes_pe_overrides(tmp_path):
    from src.chat.store import ModelLoadError, load, parse_pe_overrides

    model_cfg = tiny_model_cfg("rope", "regular")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "checkpoints", 1, build_model(model_cfg), model_cfg, {"step": 1}, keep_last=1)
    overrides = parse_pe_overrides(["scaling.type=yarn", "scaling.factor=4"])
    assert overrides == {"scaling": {"type": "yarn", "factor": 4}}
    loaded = load(str(tmp_path), "cpu", overrides)
    assert loaded.model.pe.variant_name() == "yarn×4"
    assert math.isclose(loaded.model.pe.magnitude, 0.1 * math.log(4) + 1)
    assert loaded.info["pe"] == "rope+yarn×4"
    with pytest.raises(ModelLoadError, match="KEY=VALUE"):
        parse_pe_overrides(["scaling"])
    with pytest.raises(ModelLoadError, match="model.pe.scaling.typo=1 does not fit"):
        load(str(tmp_path), "cpu", parse_pe_overrides(["scaling.typo=1"]))
