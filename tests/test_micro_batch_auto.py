"""trainer.micro_batch_size=auto (issue "GPU readiness", item 3): the largest power-of-two micro-batch whose first
step fits, found by halving on an out-of-memory error, with total_batch_tokens kept exact.

No GPU here: the out-of-memory error is injected, a GPT forward under autograd that raises torch.OutOfMemoryError
(what a CUDA allocator raises) when the micro-batch holds more than `fits` sequences. Evaluation runs without
autograd and is left alone.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from src.errors import ConfigError
from src.model.gpt import GPT
from src.preflight import check_inputs
from src.structured import to_dataclass
from src.training import trainer
from src.training.config import TrainerConfig
from src.training.distributed import DistContext
from src.training.micro_batch import any_rank_out_of_memory, micro_batch_candidates
from src.training.trainer import MicroBatchDoesNotFit, train
from tests.conftest import ROOT
from tests.train_helpers import compose_train, next_batch_that_signals, tiny_overrides
from tests.train_helpers import record_rows as rows
from tests.train_helpers import train_losses as losses

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# tiny model: block_size 32, so 256 tokens a step are 8 sequences: auto tries 8 (grad_accum 1), 4, 2, 1
TOKENS = "trainer.total_batch_tokens=256"
ORIGINAL_FORWARD = GPT.forward


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def out_of_memory_above(fits: int | None, calls: list[int] | None = None):
    """A GPT.forward that runs out of memory for a training micro-batch of more than `fits` sequences (None: even
    1 does not fit); the sizes it is called with under autograd go into `calls`."""
    def forward(self, idx, targets=None, kv_cache=None):
        if torch.is_grad_enabled():
            if calls is not None:
                calls.append(idx.shape[0])
            if fits is None or idx.shape[0] > fits:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a micro-batch of {idx.shape[0]}")
        return ORIGINAL_FORWARD(self, idx, targets, kv_cache)

    return forward


def overrides(data_dir, micro_batch_size, steps: int = 4, extra: list[str] = ()) -> list[str]:
    return tiny_overrides(data_dir, steps=steps, extra=[TOKENS, f"trainer.micro_batch_size={micro_batch_size}",
                                                        "trainer.ckpt_every=100", *extra])


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def val_losses(run_dir) -> list[float]:
    return [r["val/loss"] for r in rows(run_dir) if "val/loss" in r]


# ---------------------------------------------------------------------------------------------- the config value
@pytest.mark.parametrize("value, parsed", [("auto", "auto"), ("16", 16), ("1", 1), ("'16'", 16)])
def test_micro_batch_size_is_a_positive_number_or_auto(value, parsed):
    cfg = compose_train([f"trainer.micro_batch_size={value}"])
    assert to_dataclass(TrainerConfig, cfg.trainer).micro_batch_size == parsed


@pytest.mark.parametrize("value, shown", [("0", "0"), ("-1", "-1"), ("big", "'big'"), ("1.5", "1.5"),
                                          ("true", "True"), ("Auto", "'Auto'"), ("null", "None")])
def test_a_bad_micro_batch_size_is_one_line_naming_the_key_and_the_allowed_values(value, shown, tmp_path):
    cfg = compose_train([f"trainer.micro_batch_size={value}", f"data.cache_dir={tmp_path}"])
    with pytest.raises(ConfigError) as raised:
        check_inputs(cfg)
    message = str(raised.value)
    assert message == (f"trainer.micro_batch_size must be positive (a whole number of sequences) or 'auto' (the "
                       f"largest that fits), got {shown}")


def test_auto_needs_total_batch_tokens_to_be_a_multiple_of_block_size_times_world_size(tmp_path):
    cfg = compose_train(["model=tiny", "trainer.micro_batch_size=auto", "trainer.total_batch_tokens=100",
                         f"data.cache_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"trainer.total_batch_tokens \(100\) must be a multiple of block_size x "
                                          r"world_size \(trainer.micro_batch_size=auto\) = 32: e.g. "
                                          r"trainer.total_batch_tokens=96"):
        check_inputs(cfg)


def test_the_124m_recipe_searches_for_its_micro_batch():
    cfg = compose_train(["experiment=gpt2_124m_fineweb"])
    assert to_dataclass(TrainerConfig, cfg.trainer).micro_batch_size == "auto"


@pytest.mark.parametrize("sequences, candidates", [
    (512, [512, 256, 128, 64, 32, 16, 8, 4, 2, 1]),  # 124M: 524288 tokens / 1024 on one GPU: grad_accum 1 first
    (64, [64, 32, 16, 8, 4, 2, 1]),  # the same on 8 GPUs
    (8, [8, 4, 2, 1]),
    (1, [1]),
    (12, [4, 2, 1]),  # not a power of two: the largest power of two that divides it (grad_accum 3) first
])
def test_the_sizes_auto_tries_divide_the_batch_largest_first(sequences, candidates):
    assert micro_batch_candidates(sequences) == candidates
    assert all(sequences % size == 0 for size in candidates)


# ---------------------------------------------------------------------------------------------- one process
def test_auto_picks_the_largest_size_that_fits_and_trains_as_that_size_fixed(data_dir, tmp_path, monkeypatch,
                                                                             caplog):
    """8 and 4 run out of memory, 2 fits: the losses, the evaluation and the weights are those of a run with
    micro_batch_size=2 fixed, bit for bit (the retries start from the same batches, RNG state and gradients)."""
    train(compose_train(overrides(data_dir, 2)), tmp_path / "fixed")
    calls = []
    monkeypatch.setattr(GPT, "forward", out_of_memory_above(2, calls))
    with caplog.at_level(logging.INFO, logger="src.training.trainer"):
        result = train(compose_train(overrides(data_dir, "auto")), tmp_path / "auto")
    assert calls[:4] == [8, 4, 2, 2]  # each size's first forward; 2 fits, its try takes two micro-batches
    assert set(calls[4:]) == {2}
    assert losses(tmp_path / "auto") == losses(tmp_path / "fixed") and len(losses(tmp_path / "fixed")) == 4
    assert val_losses(tmp_path / "auto") == val_losses(tmp_path / "fixed")
    for run in ("auto", "fixed"):
        record = summary(tmp_path / run)
        assert (record["status"], record["micro_batch_size"], record["grad_accum"]) == ("finished", 2, 4), run
    assert (result["micro_batch_size"], result["grad_accum"]) == (2, 4)
    chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith("micro_batch_size ")]
    assert chosen == ["micro_batch_size 2 x grad_accum 4 x world_size 1 x block_size 32 = 256 tokens per step "
                      "(auto: the largest that fits; 8, 4 ran out of memory)"]


def test_without_an_out_of_memory_error_auto_takes_the_whole_batch_at_once(data_dir, tmp_path):
    result = train(compose_train(overrides(data_dir, "auto", steps=1)), tmp_path)
    assert (result["micro_batch_size"], result["grad_accum"]) == (8, 1)
    assert (summary(tmp_path)["micro_batch_size"], summary(tmp_path)["grad_accum"]) == (8, 1)


def test_when_not_even_one_sequence_fits_the_run_fails_in_one_line(data_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(GPT, "forward", out_of_memory_above(None, calls))
    with pytest.raises(MicroBatchDoesNotFit) as raised:
        train(compose_train(overrides(data_dir, "auto")), tmp_path)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(
        "trainer.micro_batch_size=auto: not even a micro-batch of 1 sequence (32 tokens) fits in the memory of cpu")
    assert calls == [8, 4, 2, 1]
    record = summary(tmp_path)
    assert record["status"] == "failed" and record["error"] == f"MicroBatchDoesNotFit: {message}"
    assert record["step"] == 0 and record["micro_batch_size"] is None
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_an_error_other_than_out_of_memory_is_not_retried(data_dir, tmp_path, monkeypatch):
    def broken(self, idx, targets=None, kv_cache=None):
        raise RuntimeError("a bug")

    monkeypatch.setattr(GPT, "forward", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        train(compose_train(overrides(data_dir, "auto")), tmp_path)
    assert summary(tmp_path)["error"] == "RuntimeError: a bug"


def test_a_resumed_run_keeps_the_size_it_found(data_dir, tmp_path, monkeypatch, caplog):
    """Stopped at step 2 after finding 2; resumed where 8 would fit: it keeps 2, and searches nothing, and the
    run is the one with 2 fixed."""
    train(compose_train(overrides(data_dir, 2)), tmp_path / "fixed")
    run_dir = tmp_path / "auto"
    with monkeypatch.context() as m:
        m.setattr(GPT, "forward", out_of_memory_above(2))
        # batches: the tries take 1 (8), 1 (4) and 2 (2); then 4 a step: batch 10 is in step 2
        m.setattr(trainer.TokenLoader, "next_batch", next_batch_that_signals(10, signal.SIGTERM))
        assert train(compose_train(overrides(data_dir, "auto")), run_dir)["step"] == 2
    calls = []
    monkeypatch.setattr(GPT, "forward", out_of_memory_above(8, calls))
    with caplog.at_level(logging.INFO, logger="src.training.trainer"):
        result = train(compose_train(overrides(data_dir, "auto")), run_dir)
    assert result["status"] == "finished" and (result["micro_batch_size"], result["grad_accum"]) == (2, 4)
    assert calls == [2] * 8  # steps 3 and 4, no try
    assert any("(auto: the size the resumed checkpoint ran with)" in r.getMessage() for r in caplog.records)
    assert losses(run_dir) == losses(tmp_path / "fixed")


KEYS = ("status", "micro_batch_size", "grad_accum", "attention_backend")


@pytest.mark.parametrize("attention, backend", [("flash", "sdpa"), ("regular", "explicit")])
def test_the_summary_has_the_size_and_the_attention_backend_while_running_and_for_a_fixed_size(
        attention, backend, data_dir, tmp_path, monkeypatch):
    seen = []

    def log(self, loss, norm, lr):
        seen.append({k: summary(self.record.run_dir)[k] for k in KEYS})

    monkeypatch.setattr(trainer.TrainingRun, "log", log)
    result = train(compose_train(overrides(data_dir, 4, steps=1, extra=[f"model/attention={attention}"])), tmp_path)
    assert seen == [{"status": "running", "micro_batch_size": 4, "grad_accum": 2, "attention_backend": backend}]
    assert {k: result[k] for k in KEYS} == {"status": "finished", "micro_batch_size": 4, "grad_accum": 2,
                                            "attention_backend": backend}


def test_a_fallback_in_the_first_step_is_the_attention_backend_of_the_summary(data_dir, tmp_path, monkeypatch):
    """FlexAttention probed fine before training, then failed in the first step: the dense path from then on."""
    answers = iter(["flex", "sdpa+bias-mask"])
    monkeypatch.setattr(trainer, "attention_backend", lambda model, device: next(answers))
    result = train(compose_train(overrides(data_dir, 4, steps=2)), tmp_path)
    assert result["attention_backend"] == summary(tmp_path)["attention_backend"] == "sdpa+bias-mask"


@pytest.mark.slow
def test_the_cli_reports_a_model_that_does_not_fit_in_one_line(data_dir, tmp_path):
    """`python -m src.train`, with the out-of-memory error injected first: `error: ...`, exit 1."""
    program = (
        "import runpy, torch\n"
        "from src.model.gpt import GPT\n"
        "def forward(self, idx, targets=None, kv_cache=None):\n"
        "    raise torch.OutOfMemoryError('CUDA out of memory')\n"
        "GPT.forward = forward\n"
        "runpy.run_module('src.train', run_name='__main__', alter_sys=True)\n"  # as `python -m src.train`
    )
    args = [*overrides(data_dir, "auto"), f"runs_dir={tmp_path}", "run_name=oom"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([sys.executable, "-c", program, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1].startswith("error: trainer.micro_batch_size=auto: not even a micro-batch of "
                                                   "1 sequence"), proc.stderr[-3000:]
    assert summary(tmp_path / "oom")["status"] == "failed"


# ---------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_gloo(rank: int, world_size: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _agreement_worker(rank, world_size, port, flags, out_dir):
    _init_gloo(rank, world_size, port)
    torch.distributed.init_process_group("gloo")
    try:
        dist = DistContext(rank, rank, world_size)
        agreed = [any_rank_out_of_memory(flag[rank], dist, torch.device("cpu")) for flag in flags]
        (out_dir / f"rank{rank}.json").write_text(json.dumps(agreed))
    finally:
        torch.distributed.destroy_process_group()


def test_the_ranks_agree_when_any_of_them_ran_out_of_memory(tmp_path):
    """The decision of every try is the MAX over the ranks: one rank out of memory makes all of them retry."""
    flags = [(False, False), (True, False), (False, True), (True, True)]
    mp.spawn(_agreement_worker, args=(2, _free_port(), flags, tmp_path), nprocs=2, join=True)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [False, True, True, True]
    assert any_rank_out_of_memory(True, DistContext(), torch.device("cpu")) is True  # one process: its own flag
    assert any_rank_out_of_memory(False, DistContext(), torch.device("cpu")) is False


def _ddp_worker(rank, world_size, port, cfg_yaml, run_dir, fits_on_rank):
    _init_gloo(rank, world_size, port)
    if rank in fits_on_rank:
        GPT.forward = out_of_memory_above(fits_on_rank[rank])
    try:
        result = train(OmegaConf.create(cfg_yaml), run_dir)
        result = {k: result.get(k) for k in ("status", "micro_batch_size", "grad_accum")}
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        result = {"raised": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-1500:]}
    (run_dir / f"rank{rank}.json").write_text(json.dumps(result))


def _two_ranks(data_dir, run_dir, micro_batch_size, fits_on_rank) -> list[dict]:
    run_dir.mkdir()
    cfg_yaml = OmegaConf.to_yaml(compose_train(overrides(data_dir, micro_batch_size, steps=3)), resolve=True)
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg_yaml, run_dir, fits_on_rank), nprocs=2, join=True)
    return [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_under_ddp_one_rank_out_of_memory_makes_every_rank_take_the_smaller_size(data_dir, tmp_path):
    """2 gloo ranks, 4 sequences each a step; only rank 1 runs out of memory above 1 sequence: both choose 1
    (grad_accum 4), nobody hangs, and the losses are those of the 2-rank run with 1 fixed, bit for bit."""
    train(compose_train(overrides(data_dir, 1, steps=1)), tmp_path / "prepare")  # the shards, before the ranks
    fixed = _two_ranks(data_dir, tmp_path / "fixed", 1, {})
    auto = _two_ranks(data_dir, tmp_path / "auto", "auto", {1: 1})
    for result in (*fixed, *auto):
        assert result == {"status": "finished", "micro_batch_size": 1, "grad_accum": 4}, result
    assert losses(tmp_path / "auto") == losses(tmp_path / "fixed") and len(losses(tmp_path / "fixed")) == 3
    assert summary(tmp_path / "auto")["world_size"] == 2
