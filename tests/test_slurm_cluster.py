"""submitit against a real single-node SLURM cluster (scripts/slurm_cluster.sh). Runs as root; ~1 minute."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from tests.slurm_helpers import (  # noqa: F401  (slurm_cluster is a fixture)
    release_requeued,
    run_script,
    slurm_cluster,
    wait_job_state,
    wait_submitit_state,
    wait_until,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# pytest imports this file as a top-level module "test_slurm_cluster" that the job's interpreter cannot
# import: make cloudpickle ship the job functions/classes below by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

N_STEPS = 30
STEP_S = 0.5


# ------------------------------------------------------------------------------------------ job payloads
def add(a: int, b: int) -> int:
    return a + b


def square_with_env(x: int) -> tuple[int, str]:
    return x * x, os.environ.get("SLURM_ARRAY_TASK_ID", "")


def fail(msg: str) -> None:
    raise ValueError(msg)


class ResumableCounter(submitit.helpers.Checkpointable):
    """Counts to n_steps, appending "step i" to a file after each step. A (re)started run first writes
    "start k" where k = number of steps already in the file, and continues from there."""

    def __call__(self, path: str, n_steps: int, step_s: float) -> int:
        progress = Path(path)
        done = progress.read_text().count("step ") if progress.exists() else 0
        with progress.open("a") as f:
            f.write(f"start {done}\n")
        for i in range(done, n_steps):
            time.sleep(step_s)
            with progress.open("a") as f:
                f.write(f"step {i}\n")
        return n_steps


# ------------------------------------------------------------------------------------------ helpers
def make_executor(folder: Path, **params) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    assert executor.cluster == "slurm"
    executor.update_parameters(slurm_partition="debug", timeout_min=10, cpus_per_task=1, **params)
    return executor


# ------------------------------------------------------------------------------------------ tests
def test_cluster_is_up_and_clients_need_no_env(slurm_cluster):  # noqa: F811
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    if Path("/etc/slurm/slurm.conf").resolve() != slurm_cluster.conf.resolve():
        env = os.environ.copy()  # a foreign /etc/slurm/slurm.conf: the fixture exported SLURM_CONF
    sinfo = subprocess.run(
        ["sinfo", "-h", "-p", "debug", "-o", "%a %T"], env=env, capture_output=True, text=True, check=True
    )
    assert sinfo.stdout.split()[0] == "up"
    assert sinfo.stdout.split()[1] in {"idle", "mixed", "allocated"}
    # accounting works (submitit relies on sacct to see cancelled/failed jobs)
    subprocess.run(["sacct", "-n", "-X"], env=env, capture_output=True, text=True, check=True)
    # `start` on a running cluster is a quick no-op
    t0 = time.monotonic()
    out = run_script("start").stdout
    assert "already running" in out
    assert time.monotonic() - t0 < 10


def test_single_job_returns_result(slurm_cluster, tmp_path):  # noqa: F811
    job = make_executor(tmp_path).submit(add, 2, 3)
    assert job.result() == 5
    assert wait_submitit_state(job, "COMPLETED") == "COMPLETED"


def test_job_array(slurm_cluster, tmp_path):  # noqa: F811
    jobs = make_executor(tmp_path).map_array(square_with_env, [3, 4])
    assert len(jobs) == 2
    assert jobs[0].job_id.split("_")[0] == jobs[1].job_id.split("_")[0]  # one array
    assert [j.result() for j in jobs] == [(9, "0"), (16, "1")]


def test_preempted_checkpointable_job_resumes(slurm_cluster, tmp_path):  # noqa: F811
    progress = tmp_path / "progress.txt"
    job = make_executor(tmp_path / "logs").submit(ResumableCounter(), str(progress), N_STEPS, STEP_S)

    def steps_done() -> int:
        return progress.read_text().count("step ") if progress.exists() else 0

    wait_until(lambda: steps_done() >= 5, timeout=60, what="5 steps of progress")
    # What SLURM sends before preemption/time limit (submitit asks for --signal=USR2@90): submitit's
    # handler calls checkpoint() and requeues the job (`scontrol requeue`).
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, capture_output=True)
    # The requeued job sits PENDING (reason BeginTime) for ~120 s: let it go now.
    release_requeued(job.job_id, timeout=60)

    wait_until(job.done, timeout=90, what=f"job {job.job_id} to finish after the restart", poll=1)
    assert job.result() == N_STEPS
    lines = progress.read_text().split()
    starts = [int(n) for word, n in zip(lines[::2], lines[1::2]) if word == "start"]
    steps = [int(n) for word, n in zip(lines[::2], lines[1::2]) if word == "step"]
    assert len(starts) == 2, f"expected exactly one restart, got progress file:\n{progress.read_text()}"
    assert starts[0] == 0 and 0 < starts[1] < N_STEPS, starts
    assert steps == list(range(N_STEPS)), "steps redone or skipped: the job did not resume from its progress"
    assert wait_submitit_state(job, "COMPLETED") == "COMPLETED"
    stdout = job.stdout() or ""
    stderr = job.stderr() or ""
    assert "USR2" in stdout + stderr  # submitit logged the signal it caught


def test_failing_job_reported_while_sibling_succeeds(slurm_cluster, tmp_path):  # noqa: F811
    executor = make_executor(tmp_path)
    with executor.batch():
        ok = executor.submit(add, 40, 2)
        bad = executor.submit(fail, "boom from the job")
    assert ok.result() == 42
    exc = bad.exception()
    assert exc is not None
    assert "boom from the job" in str(exc)
    with pytest.raises(submitit.core.utils.FailedJobError):
        bad.result()
    assert wait_job_state(bad.job_id, "FAILED", timeout=30) == "FAILED"  # squeue/sacct view
    assert wait_submitit_state(bad, "FAILED") == "FAILED"  # submitit's view (job.state)
    assert wait_submitit_state(ok, "COMPLETED") == "COMPLETED"
