"""The training entrypoint end to end: every combination, run record, resume, failures, DDP, config errors."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from src.checkpoint import latest_valid_checkpoint, list_checkpoints
from src.model import build_model
from src.model.gpt import GPT
from src.training.trainer import TrainingDiverged, train
from tests.conftest import ATTENTIONS, PES, ROOT, sized_overrides
from tests.train_helpers import compose_train, tiny_overrides


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def metric_rows(run_dir, key="train/loss"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def assert_complete_record(run_dir, steps):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == steps
    assert math.isfinite(summary["val/loss"]) and math.isfinite(summary["train/loss"])
    assert sorted(metric_rows(run_dir)) == list(range(1, steps + 1))
    assert OmegaConf.load(run_dir / "config.yaml").trainer.max_steps == steps
    assert list_checkpoints(run_dir / "checkpoints")[-1].name == f"step_{steps:08d}"
    return summary


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("pe", PES)
def test_every_combination_trains_and_writes_a_run_record(pe, attention, data_dir, tmp_path):
    extra = [f"model/pe={pe}", f"model/attention={attention}"]
    block_size = compose_train(tiny_overrides(data_dir, extra=extra)).model.block_size
    extra += sized_overrides(pe, attention, block_size)  # each component sized for the tiny context (Linformer)
    summary = train(compose_train(tiny_overrides(data_dir, extra=extra)), tmp_path)
    assert_complete_record(tmp_path, 2)
    assert (summary["pe"], summary["attention"]) == (pe, attention)


@pytest.mark.slow
def test_real_subprocess_run(data_dir, tmp_path):
    overrides = tiny_overrides(data_dir, steps=3, extra=["model/pe=alibi", f"runs_dir={tmp_path}", "run_name=cli"])
    result = subprocess.run([sys.executable, "-m", "src.train", *overrides], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_complete_record(tmp_path / "cli", 3)
    assert (tmp_path / "cli" / ".hydra" / "overrides.yaml").exists()


def test_resume_reproduces_the_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    overrides = tiny_overrides(data_dir, steps=20, extra=["trainer.ckpt_every=10", "trainer.eval_every=10"])
    straight = tmp_path / "straight"
    train(compose_train(overrides), straight)

    # Interrupt a second run during step 11 (after the step-10 checkpoint), then start it again.
    from src.data import TokenLoader

    original, calls = TokenLoader.next_batch, {"n": 0}

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] > 10:
            raise KeyboardInterrupt
        return original(self)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(TokenLoader, "next_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(compose_train(overrides), resumed)
    assert json.loads((resumed / "summary.json").read_text())["status"] == "interrupted"
    calls["n"] = -10**9  # count the resumed run's batches: it must train only steps 11-20
    train(compose_train(overrides), resumed)
    assert calls["n"] == -10**9 + 10

    assert metric_rows(resumed) == metric_rows(straight)  # exact, not approximate
    assert metric_rows(resumed, "val/loss") == metric_rows(straight, "val/loss")
    assert_complete_record(resumed, 20)


def test_a_finished_run_is_not_trained_again(data_dir, tmp_path):
    cfg = compose_train(tiny_overrides(data_dir))
    first = train(cfg, tmp_path)
    again = train(cfg, tmp_path)
    assert again == first and len(metric_rows(tmp_path)) == 2


def test_corrupt_checkpoint_falls_back_to_the_previous_one(data_dir, tmp_path, caplog):
    overrides = tiny_overrides(data_dir, steps=4, extra=["trainer.ckpt_every=2"])
    train(compose_train(overrides), tmp_path)
    first_losses = metric_rows(tmp_path)
    newest, previous = list_checkpoints(tmp_path / "checkpoints")[::-1][:2]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated copy

    model = build_model(compose_train(overrides).model)
    with caplog.at_level("WARNING"):
        found, state = latest_valid_checkpoint(tmp_path / "checkpoints", model)
    assert found == previous and state["step"] == 2
    assert "skipping damaged checkpoint" in caplog.text and "model.safetensors" in caplog.text

    (tmp_path / "summary.json").unlink()  # pretend the run never finished: it must redo steps 3-4
    train(compose_train(overrides), tmp_path)
    assert metric_rows(tmp_path) == first_losses


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    original, calls = GPT.forward, {"n": 0}

    def diverging(self, idx, targets=None):
        logits, loss = original(self, idx, targets)
        calls["n"] += 1
        return logits, loss * float("nan") if calls["n"] > 2 else loss

    monkeypatch.setattr(GPT, "forward", diverging)
    cfg = compose_train(tiny_overrides(data_dir, steps=5, extra=["trainer.ckpt_every=2"]))
    with pytest.raises(TrainingDiverged, match="diverged at step 3"):
        train(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "TrainingDiverged" in summary["error"]
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.max_stepz=3"], "max_stepz"),
        (["model/pe=fourier"], "fourier"),
        (["model.pe.mlp_width=8"], "mlp_width"),
        (["trainer.lr=fast"], "lr"),
    ],
)
def test_config_typos_fail_at_compose_time(overrides, message):
    with pytest.raises(Exception, match=message):
        compose_train(overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.resume=sometimes"], "trainer.resume must be 'auto' or 'never'"),
        (["trainer.total_batch_tokens=100"], "must be a multiple of"),
        (["model.n_head=5"], "divisible by model.n_head"),
    ],
)
def test_invalid_values_fail_with_a_clear_message(overrides, message, data_dir, tmp_path):
    with pytest.raises(ValueError, match=message):
        train(compose_train(tiny_overrides(data_dir, extra=overrides)), tmp_path)


def _ddp_worker(rank, world_size, port, cfg_yaml, run_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(OmegaConf.create(cfg_yaml), run_dir)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(data_dir, tmp_path):
    """2 gloo ranks x 2 sequences == 1 process x 4 sequences: the same global batch, the same losses."""
    base = tiny_overrides(data_dir, steps=3, extra=["trainer.total_batch_tokens=128", "model/pe=rope"])
    single = compose_train([*base, "trainer.micro_batch_size=4"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    train(single, tmp_path / "single")  # prepares the data before the ranks start, too
    torch.set_num_threads(1)
    ddp_cfg = OmegaConf.to_yaml(compose_train([*base, "trainer.micro_batch_size=2"]), resolve=True)
    mp.spawn(_ddp_worker, args=(2, port, ddp_cfg, tmp_path / "ddp"), nprocs=2, join=True)
    single_losses, ddp_losses = metric_rows(tmp_path / "single"), metric_rows(tmp_path / "ddp")
    assert single_losses.keys() == ddp_losses.keys() == {1, 2, 3}
    for step in single_losses:
        assert ddp_losses[step] == pytest.approx(single_losses[step], rel=1e-5)
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_default_run_learns(tmp_path):
    """`python -m src.train` with no arguments: the README's first run. Val loss >= 3 nats below ln(vocab)."""
    env = dict(os.environ, PEGRID_DATA_DIR=str(tmp_path / "data"))
    result = subprocess.run([sys.executable, "-m", "src.train", f"runs_dir={tmp_path}", "run_name=default"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["val/loss"] <= math.log(50257) - 3, summary


def test_hellaswag_unavailable_fails_before_training(data_dir, tmp_path):
    from src.eval.hellaswag import HellaSwagUnavailableError

    cfg = compose_train(tiny_overrides(data_dir, extra=["eval.hellaswag.enabled=true",
                                                        f"eval.hellaswag.path={tmp_path}/missing.jsonl"]))
    with pytest.raises(HellaSwagUnavailableError, match="eval.hellaswag.enabled=false"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_wandb_logger_path_runs_with_wandb_disabled(data_dir, tmp_path):
    """The real W&B code path (init, define_metric, log, summary, finish) with mode=disabled: no network."""
    cfg = compose_train(tiny_overrides(data_dir, extra=["logger=wandb", "logger.mode=disabled",
                                                        "sweep_name=unit", "run_name=wandb-run"]))
    summary = train(cfg, tmp_path)
    assert summary["status"] == "finished" and summary["sweep"] == "unit"
    run_id = (tmp_path / "wandb_run_id.txt").read_text()
    assert summary["wandb_run_id"] == run_id
    assert train(cfg, tmp_path)["wandb_run_id"] == run_id  # a resumed run keeps its W&B id


def test_gpt2_124m_experiment_preset_composes_to_the_build_nanogpt_recipe():
    cfg = compose_train(["experiment=gpt2_124m_fineweb", "model/pe=alibi"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (12, 12, 768, 1024)
    assert cfg.model.pe.name == "alibi" and cfg.data.name == "fineweb_edu" and cfg.logger.name == "wandb"
    t = cfg.trainer
    assert (t.total_batch_tokens, t.lr, t.warmup_steps, t.max_steps) == (524288, 6e-4, 715, 19073)
    assert t.max_steps * t.total_batch_tokens == pytest.approx(10e9, rel=0.001)  # 10B tokens
    model = build_model(cfg.model)
    assert 123e6 < model.num_params(non_embedding=False) < 125e6  # GPT-2 124M (vocab padded to 50304)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["trainer.compile=true"], ["trainer.dtype=bfloat16", "model/pe=fire"]])
def test_compiled_and_bf16_autocast_runs(extra, data_dir, tmp_path):
    """The GPU recipe's switches (torch.compile, bf16 autocast) also work on CPU, end to end."""
    summary = train(compose_train(tiny_overrides(data_dir, extra=extra)), tmp_path)
    assert summary["status"] == "finished" and math.isfinite(summary["val/loss"])


def test_multirun_dir_is_the_sweep_name_or_a_timestamped_multirun_dir():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        by_hand = compose(config_name="train", overrides=["runs_dir=/r"], return_hydra_config=True)
        swept = compose(config_name="train", overrides=["runs_dir=/r", "sweep_name=grid"], return_hydra_config=True)
    assert by_hand.hydra.sweep.dir.startswith("/r/multirun-")  # was "/r/None"
    assert swept.hydra.sweep.dir == "/r/grid"
