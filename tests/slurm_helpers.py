"""Helpers for tests that run against the real local SLURM cluster of ``scripts/slurm_cluster.sh``.

Use the session fixture from a conftest (or a test module) with::

    from tests.slurm_helpers import slurm_cluster  # noqa: F401  (a fixture: pytest finds it in the module)

(package-qualified, like ``from tests.conftest import ...``: pytest is run from the repository root).

``slurm_cluster`` starts the cluster if it is not running and stops it again at the end of the session only
if it started it (a cluster that was already up is left as it was found). It does not skip: the SLURM tests
are meant to run in CI, which runs as root. Everything else here is plain functions usable without pytest.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "slurm_cluster.sh"
STATE_DIR = Path(os.environ.get("PEGRID_SLURM_STATE_DIR", "/tmp/pegrid-slurm"))
PARTITION = "debug"
# Job states after which a job never runs again (squeue/sacct spelling, without "by 0" suffixes).
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
)


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
    state_dir: Path
    conf: Path
    partition: str
    started_here: bool  # True if ensure_cluster() had to start it


def run_script(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run scripts/slurm_cluster.sh with ``--state-dir STATE_DIR``; output captured as text."""
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args, "--state-dir", str(STATE_DIR)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{SCRIPT.name} {' '.join(args)} failed with rc={proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc


def cluster_running() -> bool:
    """True if all daemons of the cluster in STATE_DIR are up (``slurm_cluster.sh status`` exit code)."""
    return run_script("status", timeout=60, check=False).returncode == 0


def _export_slurm_conf_if_needed(output: str) -> None:
    # The script links /etc/slurm/slurm.conf to its config; only if it could not (a foreign file is there)
    # does it print "export SLURM_CONF=...", which we then apply to this process (and so to the jobs).
    for line in output.splitlines():
        if line.startswith("export SLURM_CONF="):
            os.environ["SLURM_CONF"] = line.split("=", 1)[1].strip()


def ensure_cluster() -> SlurmCluster:
    """Start the local cluster unless it already runs. Returns what was found/started."""
    was_running = cluster_running()
    proc = run_script("start")
    _export_slurm_conf_if_needed(proc.stdout)
    return SlurmCluster(
        state_dir=STATE_DIR, conf=STATE_DIR / "slurm.conf", partition=PARTITION, started_here=not was_running
    )


def stop_cluster() -> None:
    run_script("stop", timeout=120)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Session-wide local SLURM cluster; stopped at session end only if this session started it."""
    cluster = ensure_cluster()
    try:
        yield cluster
    finally:
        if cluster.started_here:
            stop_cluster()


# ------------------------------------------------------------------------------------------- job queries
def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def job_state(job_id: str) -> str | None:
    """Current state of a job (e.g. ``PENDING``, ``RUNNING``, ``COMPLETED``), from squeue while the
    controller still lists it, else from accounting (sacct). None if neither knows the job (yet)."""
    proc = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T"])
    if proc.returncode == 0 and proc.stdout.strip():
        return proc.stdout.split()[0].strip()
    proc = _run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"])
    if proc.returncode == 0 and proc.stdout.strip():
        # Last line = latest record of the job (a requeued job has one record per run); "CANCELLED by 0".
        return proc.stdout.strip().splitlines()[-1].split()[0]
    return None


def job_reason(job_id: str) -> str:
    proc = _run(["squeue", "-h", "-j", str(job_id), "-o", "%r"])
    return proc.stdout.strip()


def wait_job_state(job_id: str, states: str | Iterable[str], timeout: float = 60, poll: float = 0.25) -> str:
    """Poll until the job is in one of ``states``; returns that state. Raises TimeoutError (with the last
    state seen) after ``timeout`` seconds, or AssertionError if the job reaches a final state that was not
    asked for (it would never get there)."""
    wanted = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout
    state = None
    while True:
        state = job_state(job_id)
        if state in wanted:
            return state
        if state in FINAL_STATES:
            raise AssertionError(f"job {job_id} ended in {state}, never reached {sorted(wanted)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not in {sorted(wanted)} after {timeout}s (last state: {state})")
        time.sleep(poll)


def release_requeued(job_id: str, timeout: float = 60) -> None:
    """A requeued job waits ~120 s (PENDING, reason BeginTime) before it may start again. Wait until it is
    PENDING, then ``scontrol update JobId=<id> StartTime=now`` (retried until the job leaves PENDING)."""
    wait_job_state(job_id, "PENDING", timeout=timeout)
    # slurmd refuses a batch job whose credential is not newer than the kill that revoked the old one (both in
    # whole seconds): released in the same second, the job fails for good ("Job credential revoked").
    time.sleep(1.5)
    deadline = time.monotonic() + timeout
    while True:
        _run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
        time.sleep(0.5)
        state = job_state(job_id)
        if state != "PENDING":
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still PENDING ({job_reason(job_id)}) {timeout}s after release")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


def wait_submitit_state(job, states: str | Iterable[str], timeout: float = 30, poll: float = 0.5) -> str:
    """Wait until submitit's own view of a job (``job.state``, which comes from sacct) is in ``states``.

    ``job.state`` does not refresh by itself: when ``result()`` returns because the result file appeared,
    submitit may never have asked sacct and still says UNKNOWN/RUNNING. This forces the refresh (and the end
    record reaches the accounting database a moment after the job ends)."""
    wanted = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout
    while True:
        state = job.get_info(mode="force").get("State", "UNKNOWN").split()[0]
        if state in wanted:
            assert job.state == state
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"submitit job {job.job_id}: state {state}, expected one of {sorted(wanted)}")
        time.sleep(poll)
