"""Run records that never lie: divergence, two processes on one run dir, resume=never, the final checkpoint,
stop signals, damaged checkpoints (issue #13, items 1-6), failures while setting up."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from analysis.sources import load_local
from src.checkpoint import list_checkpoints, load_model, save_checkpoint
from src.data import TokenLoader
from src.model import build_model
from src.preflight import BAD_INPUT
from src.training import trainer
from src.training.fingerprint import config_fingerprint
from src.training.run_lock import RunDirLocked, RunLock
from src.training.trainer import TrainingDiverged, train
from tests.conftest import ROOT, tiny_model_cfg
from tests.train_helpers import compose_train, next_batch_that_signals, tiny_overrides
from tests.train_helpers import record_rows as rows
from tests.train_helpers import train_losses as losses


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def all_finite(ckpt_dir) -> bool:
    weights = load_file(str(ckpt_dir / "model.safetensors"))
    state = torch.load(ckpt_dir / "training_state.pt", weights_only=True)
    tensors = list(weights.values()) + [v for s in state["optimizer"]["state"].values() for v in s.values()]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


# ---------------------------------------------------------------------------------------------- 0. setup failures
@pytest.mark.parametrize("phase", ["ensure_prepared", "build_model", "latest_valid_checkpoint", "build_logger"])
def test_a_failure_while_setting_up_is_in_the_summary(phase, data_dir, tmp_path, monkeypatch):
    """Preparing data, building the model, resuming, starting the tracker: was no summary.json at all."""
    def failing(*args, **kwargs):
        raise RuntimeError(f"{phase} failed")

    monkeypatch.setattr(trainer, phase, failing)
    with pytest.raises(RuntimeError, match=f"{phase} failed"):
        train(compose_train(tiny_overrides(data_dir)), tmp_path)
    record = summary(tmp_path)
    assert record["status"] == "failed" and record["error"] == f"RuntimeError: {phase} failed"
    assert record["stopped_by"] is None and record["step"] == 0
    assert (record["pe"], record["attention"], record["max_steps"]) == ("learned", "flash", 2)
    assert "config_fingerprint" in record and "git_commit" in record


def test_a_failed_resume_replaces_the_earlier_attempts_status(data_dir, tmp_path, monkeypatch):
    """The interrupted attempt's status and error were left standing when the next attempt failed to resume."""
    overrides = tiny_overrides(data_dir, steps=4, extra=["trainer.ckpt_every=100"])
    with monkeypatch.context() as m:
        m.setattr(TokenLoader, "next_batch", next_batch_that_signals(2, signal.SIGTERM))
        assert train(compose_train(overrides), tmp_path)["status"] == "interrupted"

    def failing(state):
        raise RuntimeError("unreadable RNG state")

    monkeypatch.setattr(trainer, "restore_rng_state", failing)
    with pytest.raises(RuntimeError, match="unreadable RNG state"):
        train(compose_train(overrides), tmp_path)
    record = summary(tmp_path)
    assert record["status"] == "failed" and record["error"] == "RuntimeError: unreadable RNG state"
    assert record["stopped_by"] is None and record["step"] == 2 and record["num_params"] > 0


def test_a_second_ctrl_c_while_setting_up_is_in_the_summary(data_dir, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "build_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(compose_train(tiny_overrides(data_dir)), tmp_path)
    record = summary(tmp_path)
    assert record["status"] == "interrupted" and record["stopped_by"] == "SIGINT"
    assert "second SIGINT at step 0" in record["error"]


HELLASWAG_OFFLINE = ["eval.hellaswag.enabled=true", "eval.hellaswag.url=http://127.0.0.1:9/hellaswag_val.jsonl"]


def test_bad_input_found_after_the_lock_writes_nothing_on_a_fresh_run_dir(data_dir, tmp_path):
    """By design (src/train.py then removes the run dir; tests/test_bad_input.py checks the CLI)."""
    cfg = compose_train(tiny_overrides(data_dir, extra=[*HELLASWAG_OFFLINE, f"eval.hellaswag.cache_dir={tmp_path}/hs"]))
    with pytest.raises(BAD_INPUT, match="could not download HellaSwag"):
        train(cfg, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.lock"]


def test_bad_input_found_on_resume_is_in_the_existing_summary(data_dir, tmp_path):
    train(compose_train(tiny_overrides(data_dir)), tmp_path)
    more = tiny_overrides(data_dir, steps=4, extra=[*HELLASWAG_OFFLINE, f"eval.hellaswag.cache_dir={tmp_path}/hs"])
    with pytest.raises(BAD_INPUT, match="could not download HellaSwag"):
        train(compose_train(more), tmp_path)
    record = summary(tmp_path)
    assert record["status"] == "failed" and record["error"].startswith("HellaSwagUnavailableError: could not download")
    assert record["step"] == 2  # what the record holds; the attempt trained nothing


# ---------------------------------------------------------------------------------------------- 1. divergence
def test_an_infinite_grad_norm_with_a_finite_loss_is_not_applied_nor_checkpointed(data_dir, tmp_path):
    """lr=1e6: at step 2 the loss is still finite (~3e11) but the gradient is not; it must not reach a checkpoint."""
    wild = tiny_overrides(data_dir, steps=30, extra=["trainer.ckpt_every=1", "trainer.lr=1e6"])
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+ .*not applied"):
        train(compose_train(wild), tmp_path)
    record = summary(tmp_path)
    assert record["status"] == "failed" and "diverged at step" in record["error"]
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert kept and all(all_finite(c) for c in kept)
    assert f"step {record['step'] + 1}" in record["error"]  # the step that diverged is named, the kept one before it


# ---------------------------------------------------------------------------------------------- 2. run dir lock
def test_a_second_process_on_a_run_dir_fails_at_once_naming_the_holder(data_dir, tmp_path):
    cfg = compose_train(tiny_overrides(data_dir))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from src.training.run_lock import RunLock\n"
        f"with RunLock(Path({str(tmp_path)!r})):\n    print('held', flush=True); time.sleep(60)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(RunDirLocked, match=f"in use by PID {holder.pid} on "):
            train(cfg, tmp_path)
        assert time.monotonic() - started < 10
        assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "summary.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing anything by hand: its lock is taken over
    assert train(cfg, tmp_path)["status"] == "finished"


def test_lock_is_exclusive_within_one_machine(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirLocked):
            RunLock(tmp_path).__enter__()
    with RunLock(tmp_path):  # released on exit
        pass


# ---------------------------------------------------------------------------------------------- 3. resume=never
def test_resume_never_moves_the_old_record_aside_instead_of_mixing(data_dir, tmp_path):
    runs = tmp_path / "sweep"
    run_dir = runs / "run"
    train(compose_train(tiny_overrides(data_dir, steps=4, extra=["trainer.ckpt_every=1"])), run_dir)
    old_losses = losses(run_dir)
    fresh = train(compose_train(tiny_overrides(data_dir, steps=2, extra=["trainer.resume=never"])), run_dir)
    assert fresh["status"] == "finished" and fresh["step"] == 2
    assert sorted(losses(run_dir)) == [1, 2]  # no rows of the old run
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000002"]
    (moved,) = (runs / ".superseded").iterdir()
    assert moved.name.startswith("run-") and losses(moved) == old_losses
    assert summary(moved)["step"] == 4 and list_checkpoints(moved / "checkpoints")


# ---------------------------------------------------------------------------------------------- 4. final checkpoint
def test_the_final_checkpoint_is_written_before_the_final_evaluation(data_dir, tmp_path, monkeypatch):
    import src.training.trainer as trainer

    overrides = tiny_overrides(data_dir, steps=6, extra=["trainer.ckpt_every=4"])
    real_evaluation = trainer.evaluate_suite

    def crashing(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(trainer, "evaluate_suite", crashing)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        train(compose_train(overrides), tmp_path)
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == "step_00000006"

    monkeypatch.setattr(trainer, "evaluate_suite", real_evaluation)
    batches = {"n": 0}
    original = TokenLoader.next_batch
    monkeypatch.setattr(TokenLoader, "next_batch", lambda self: batches.__setitem__("n", batches["n"] + 1)
                        or original(self))
    assert train(compose_train(overrides), tmp_path)["status"] == "finished"
    assert batches["n"] == 0  # only the evaluation ran again
    assert [r["step"] for r in rows(tmp_path) if "val/loss" in r] == [6]


def test_a_kill_after_the_final_evaluation_row_does_not_duplicate_it(data_dir, tmp_path, monkeypatch):
    import src.training.trainer as trainer

    cfg = compose_train(tiny_overrides(data_dir, steps=3))
    finished = train(cfg, tmp_path)
    # as if killed after the val row was logged, before the summary said "finished"
    (tmp_path / "summary.json").write_text(json.dumps(dict(finished, status="running")))
    monkeypatch.setattr(trainer, "evaluate_suite", lambda *a, **k: pytest.fail("evaluated a second time"))
    again = train(cfg, tmp_path)
    assert again["status"] == "finished" and again["val/loss"] == finished["val/loss"]
    assert [r["step"] for r in rows(tmp_path) if "val/loss" in r] == [3]


def test_a_restart_without_a_valid_checkpoint_drops_the_old_rows(data_dir, tmp_path):
    cfg = compose_train(tiny_overrides(data_dir, steps=3))
    train(cfg, tmp_path)
    for ckpt in list_checkpoints(tmp_path / "checkpoints"):
        (ckpt / "model.safetensors").write_bytes(b"garbage")
    (tmp_path / "summary.json").unlink()
    train(cfg, tmp_path)
    steps = [r["step"] for r in rows(tmp_path)]
    assert steps == [1, 2, 3, 3]  # 3 training rows and the final evaluation's, each once


# ---------------------------------------------------------------------------------------------- 5. signals
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR2])
def test_a_stop_signal_checkpoints_the_current_step_and_resumes_exactly(signum, data_dir, tmp_path, monkeypatch):
    overrides = tiny_overrides(data_dir, steps=8, extra=["trainer.ckpt_every=100"])
    train(compose_train(overrides), tmp_path / "straight")

    monkeypatch.setattr(TokenLoader, "next_batch", next_batch_that_signals(5, signum))  # during step 5
    run_dir = tmp_path / "stopped"
    stopped = train(compose_train(overrides), run_dir)
    assert stopped["status"] == "interrupted" and stopped["step"] == 5
    assert stopped["stopped_by"] == signum.name and f"{signum.name} at step 5" in stopped["error"]
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000005"]
    assert signal.getsignal(signum) is not None  # the previous handlers are back

    resumed = train(compose_train(overrides), run_dir)
    assert resumed["status"] == "finished" and resumed["error"] is None and resumed["stopped_by"] is None
    assert losses(run_dir) == losses(tmp_path / "straight")


def test_the_previous_usr2_handler_runs_after_the_checkpoint(data_dir, tmp_path, monkeypatch):
    """Under submitit, USR2 means: checkpoint, then let submitit requeue the job (its handler exits)."""
    calls = []

    def submitit_like(signum, frame):
        calls.append(sorted(p.name for p in list_checkpoints(tmp_path / "checkpoints")))
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, submitit_like)
    monkeypatch.setattr(TokenLoader, "next_batch", next_batch_that_signals(2, signal.SIGUSR2))
    try:
        with pytest.raises(SystemExit):
            train(compose_train(tiny_overrides(data_dir, steps=5, extra=["trainer.ckpt_every=100"])), tmp_path)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls == [["step_00000002"]]
    assert summary(tmp_path)["status"] == "interrupted"


def test_summary_step_is_kept_current_during_the_run(data_dir, tmp_path, monkeypatch):
    seen = []
    original = TokenLoader.next_batch

    def watching(self):
        if (tmp_path / "summary.json").exists():
            seen.append(summary(tmp_path)["step"])
        return original(self)

    monkeypatch.setattr(TokenLoader, "next_batch", watching)
    train(compose_train(tiny_overrides(data_dir, steps=4)), tmp_path)
    assert seen == [0, 1, 2, 3]


@pytest.mark.slow
def test_sigterm_to_the_cli_saves_the_step_and_exits_cleanly(data_dir, tmp_path):
    run_dir = tmp_path / "cli"
    command = [sys.executable, "-m", "src.train",
               *tiny_overrides(data_dir, steps=400, extra=["trainer.ckpt_every=1000", f"runs_dir={tmp_path}",
                                                           "run_name=cli"])]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (run_dir / "summary.json").exists() and summary(run_dir).get("step", 0) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr
    record = summary(run_dir)
    assert record["status"] == "interrupted" and record["stopped_by"] == "SIGTERM"
    assert list_checkpoints(run_dir / "checkpoints")[-1].name == f"step_{record['step']:08d}"


def test_a_run_killed_without_a_word_reads_as_failed_not_running(data_dir, tmp_path):
    """kill -9 leaves summary.json saying "running"; the analysis sees that no process holds the record and calls
    it failed, saying why (while the process lives, it is running)."""
    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "src.train",
               *tiny_overrides(data_dir, steps=4000, extra=[f"runs_dir={tmp_path}", "run_name=killed"])]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ((run_dir / "summary.json").exists()
                                               and summary(run_dir).get("step", 0) >= 3):
        time.sleep(0.2)
    [live] = load_local([tmp_path]).runs.to_dict("records")
    proc.kill()
    proc.wait(timeout=60)
    assert live["status"] == "running" and summary(run_dir)["status"] == "running"
    [dead] = load_local([tmp_path]).runs.to_dict("records")
    assert dead["status"] == "failed"
    assert dead["error"].startswith(f"its process (PID {proc.pid} on ")
    assert "the same command resumes it" in dead["error"]
    assert summary(run_dir)["status"] == "running"  # the record itself is left as it is: a resume takes it over


# ---------------------------------------------------------------------------------------------- 6. damaged checkpoints
def test_a_missing_model_config_makes_a_checkpoint_invalid_everywhere(data_dir, tmp_path, caplog):
    overrides = tiny_overrides(data_dir, steps=4, extra=["trainer.ckpt_every=2"])
    train(compose_train(overrides), tmp_path)
    previous, newest = list_checkpoints(tmp_path / "checkpoints")
    (newest / "model_config.json").unlink()
    with caplog.at_level("WARNING"):
        _, used = load_model(tmp_path)  # eval, chat and export load through this
    assert used == previous and "model_config.json is missing" in caplog.text

    (tmp_path / "summary.json").unlink()  # an unfinished run: resume must use step 2, not the damaged step 4
    batches = {"n": 0}
    original = TokenLoader.next_batch
    TokenLoader.next_batch = lambda self: batches.__setitem__("n", batches["n"] + 1) or original(self)
    try:
        train(compose_train(overrides), tmp_path)
    finally:
        TokenLoader.next_batch = original
    assert batches["n"] == 2  # steps 3 and 4 (one micro-batch each)


class Sneaky:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_an_unsafe_training_state_is_refused_without_torchs_weights_only_false_advice(data_dir, tmp_path, caplog):
    overrides = tiny_overrides(data_dir, steps=4, extra=["trainer.ckpt_every=2"])
    train(compose_train(overrides), tmp_path)
    newest = list_checkpoints(tmp_path / "checkpoints")[-1]
    with open(newest / "training_state.pt", "wb") as f:
        pickle.dump(Sneaky(), f)
    (tmp_path / "summary.json").unlink()
    with caplog.at_level("WARNING"):
        train(compose_train(overrides), tmp_path)
    assert "training_state.pt holds objects that a safe load refuses" in caplog.text
    assert "weights_only=False" not in caplog.text


# ---------------------------------------------------------------------------------------------- fingerprint
def test_the_summary_records_a_fingerprint_of_what_changes_results(data_dir, tmp_path):
    cfg = compose_train(tiny_overrides(data_dir))
    record = train(cfg, tmp_path)
    assert record["config_fingerprint"] == config_fingerprint(cfg)
    assert record["torch_version"] == torch.__version__ and "git_commit" in record
    moved = compose_train(tiny_overrides(data_dir, extra=["runs_dir=/elsewhere", "run_name=other", "logger.tags=[x]",
                                                          "trainer.progress=true", "trainer.ckpt_every=7"]))
    assert config_fingerprint(moved) == record["config_fingerprint"]
    fingerprint = record["config_fingerprint"]
    assert config_fingerprint(compose_train(tiny_overrides(data_dir, steps=3))) != fingerprint
    for changed in (["trainer.lr=1e-4"], ["model/pe=alibi"], ["eval.val.num_tokens=256"]):
        assert config_fingerprint(compose_train(tiny_overrides(data_dir, extra=changed))) != fingerprint


def test_a_checkpoint_is_on_disk_before_it_is_named_complete(tmp_path, monkeypatch):
    """Every file of a checkpoint, and its folder, are fsynced before the rename that makes it `step_*`; the
    parent folder after it (a power loss must leave the old checkpoint or a whole new one, not zero-filled files)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                  real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", str(dst))), real_replace(src, dst)))
    cfg = tiny_model_cfg("learned", "flash")
    final = save_checkpoint(tmp_path / "checkpoints", 3, build_model(cfg), cfg, {"step": 3}, keep_last=1)
    rename = events.index(("replace", str(final)))
    synced_before = {os.path.basename(path) for kind, path in events[:rename] if kind == "fsync"}
    assert {p.name for p in final.iterdir()} | {".tmp_step_00000003"} <= synced_before
    assert ("fsync", str(tmp_path / "checkpoints")) in events[rename:]
