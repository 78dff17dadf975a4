"""A resumed run reproduces the uninterrupted one exactly (README "Run record"), also when the attempt that resumes
runs with another intra-op thread count; and a stop signal under DDP ends every rank the same way (issue #13,
items 5 and 6; measured with scripts/kill_matrix.py).

On CPU the reductions of layer norm's backward, the matmuls (MKL) and sum/norm split their work by the thread
count, so one step at 1 thread differs from the same step at 2 threads in the last bit: a resume under
OMP_NUM_THREADS=1 (a `make study` run resumed by hand, a job requeued with fewer CPUs, `taskset`) was 1-2 ulp off
the uninterrupted run. Memory alignment and machine load do not matter (bitwise equal at 17 offsets, and under
load average 9)."""

from __future__ import annotations

import json
import os
import signal
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from safetensors.torch import load_file

from src.checkpoint import list_checkpoints
from src.data import TokenLoader
from src.training.trainer import train
from tests.train_helpers import compose_train, next_batch_that_signals, tiny_overrides
from tests.train_helpers import record_rows as rows
from tests.train_helpers import train_losses as losses


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def val_loss(run_dir):
    return [r["val/loss"] for r in rows(run_dir) if "val/loss" in r]


def final_weights(run_dir):
    return load_file(str(list_checkpoints(run_dir / "checkpoints")[-1] / "model.safetensors"))


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs to run at 2 threads")
def test_a_resume_with_another_thread_count_reproduces_the_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    overrides = tiny_overrides(data_dir, steps=10, extra=["trainer.ckpt_every=100", "trainer.total_batch_tokens=256",
                                                          "eval.val.num_tokens=4096"])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train(compose_train(overrides), tmp_path / "straight")
        run_dir = tmp_path / "stopped"
        with monkeypatch.context() as m:
            # in step 4 (2 micro-batches a step): step 4 finishes, is checkpointed, the run stops
            m.setattr(TokenLoader, "next_batch", next_batch_that_signals(7, signal.SIGTERM))
            assert train(compose_train(overrides), run_dir)["step"] == 4
        torch.set_num_threads(1)  # the attempt that resumes gets one thread (OMP_NUM_THREADS=1, fewer CPUs, taskset)
        assert train(compose_train(overrides), run_dir)["status"] == "finished"
    finally:
        torch.set_num_threads(threads)
    assert losses(run_dir) == losses(tmp_path / "straight")
    assert val_loss(run_dir) == val_loss(tmp_path / "straight")
    straight = final_weights(tmp_path / "straight")
    assert all(torch.equal(t, straight[k]) for k, t in final_weights(run_dir).items())


# ---------------------------------------------------------------------------------------------- DDP
def _stopped_rank(rank, world_size, port, cfg_yaml, run_dir, signalled_ranks):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if rank in signalled_ranks:
        TokenLoader.next_batch = next_batch_that_signals(3, signal.SIGTERM)
    try:
        summary = train(OmegaConf.create(cfg_yaml), run_dir)
        result = {k: summary.get(k, "<missing>") for k in ("status", "step", "stopped_by", "error")}
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        result = {"raised": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-1500:]}
    (run_dir / f"rank{rank}.json").write_text(json.dumps(result))


def _run_two_ranks(data_dir, tmp_path, signalled_ranks) -> list[dict]:
    base = tiny_overrides(data_dir, steps=40, extra=["trainer.total_batch_tokens=128", "trainer.micro_batch_size=2",
                                                     "trainer.ckpt_every=100"])
    train(compose_train(tiny_overrides(data_dir, steps=1)), tmp_path / "prepare")  # the shards, before the ranks
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "ddp"
    run_dir.mkdir()
    cfg_yaml = OmegaConf.to_yaml(compose_train(base), resolve=True)
    mp.spawn(_stopped_rank, args=(2, port, cfg_yaml, run_dir, signalled_ranks), nprocs=2, join=True)
    return [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_a_stop_signal_on_every_rank_gives_every_rank_the_summary_the_entrypoint_reads(data_dir, tmp_path):
    """src/train.py exits 128+signal reading summary["error"] and summary["stopped_by"]: a rank > 0 crashed there
    with KeyError: 'error' (torchrun, SIGTERM to the agent or to every worker: job exit status 1, not 143)."""
    results = _run_two_ranks(data_dir, tmp_path, signalled_ranks=(0, 1))
    for rank, result in enumerate(results):
        assert "raised" not in result, f"rank {rank}: {result}"
        assert result["status"] == "interrupted" and result["stopped_by"] == "SIGTERM", f"rank {rank}: {result}"
        assert result["error"] != "<missing>", f"rank {rank}: {result}"
    assert results[0]["step"] == results[1]["step"]


@pytest.mark.slow
def test_a_stop_signal_on_rank_0_only_stops_every_rank_at_the_same_step(data_dir, tmp_path):
    """The loop's stop decision is all-reduced, the branch after it read the local flag: rank 1 went on to the final
    evaluation, whose all-reduce then failed ("Connection closed by peer") once rank 0 had left (a hang with a
    backend that does not notice)."""
    results = _run_two_ranks(data_dir, tmp_path, signalled_ranks=(0,))
    for rank, result in enumerate(results):
        assert "raised" not in result, f"rank {rank}: {result}"
        assert result["status"] == "interrupted", f"rank {rank}: {result}"
    assert results[0]["step"] == results[1]["step"]
