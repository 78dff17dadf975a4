"""Sweeps (sweeps/run_sweep.py, `make sweep`, hydra/launcher=slurm) against the real local SLURM cluster of
scripts/slurm_cluster.sh: a full tiny grid, skipping finished runs, preemption + requeue + resume, a failing job,
DDP, the refusals (no GPUs, no controller) and squeue's array task counts. ~2 minutes on 2 cores (see
docs/SWEEPS.md). The first two tests need no cluster; tests/test_sweep_plan.py has the others that need none."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from src.checkpoint import list_checkpoints
from src.data.prepare import ensure_prepared
from src.training.distributed import export_submitit_env
from sweeps import run_sweep as sweep_cli
from tests.conftest import ROOT
from tests.slurm_helpers import release_requeued, slurm_cluster, wait_until  # noqa: F401  (slurm_cluster: fixture)
from tests.train_helpers import compose_train, tiny_overrides

slurm = [pytest.mark.slurm, pytest.mark.slow]
DIST_VARS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]


# ---------------------------------------------------------------------------------- no cluster needed
def test_submitit_multi_task_job_exports_the_torch_distributed_env(monkeypatch):
    saved = dict(os.environ)
    try:
        for var in DIST_VARS:
            os.environ.pop(var, None)
        assert not export_submitit_env()  # not a submitit job
        os.environ.update(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="42", SLURM_NTASKS="1", SLURM_PROCID="0",
                          SLURM_LOCALID="0", SLURM_JOB_NODELIST="node7", SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0")
        assert not export_submitit_env()  # a single task: plain single-process training
        assert "WORLD_SIZE" not in os.environ
        os.environ.update(SLURM_NTASKS="4", SLURM_PROCID="3", SLURM_LOCALID="3", SLURM_NTASKS_PER_NODE="4")
        assert export_submitit_env()
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "3")
        assert os.environ["MASTER_ADDR"] == "node7" and int(os.environ["MASTER_PORT"]) > 0
        assert not export_submitit_env()  # WORLD_SIZE set (e.g. by torchrun): left alone
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_make_error_lines_are_filtered_from_a_plain_and_a_nested_make():
    stderr = ("run_sweep: the one line\nmake: *** [Makefile:69: sweep] Error 2\n"
              "make[1]: *** [Makefile:69: sweep] Error 2\nmake[12]: *** [Makefile:39: test] Error 2\n")
    assert without_make_errors(stderr) == ["run_sweep: the one line"]


# ---------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tokenised once before any job starts, so that the jobs never race to prepare it."""
    path = tmp_path_factory.mktemp("sweep_data")
    ensure_prepared(compose_train(tiny_overrides(path)).data)
    return path


def run_sweep(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "sweeps.run_sweep", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    print(proc.stdout[-5000:], proc.stderr[-3000:])
    return proc


def train_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "train/loss" in r]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def progress_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("[sweep ")]


def without_make_errors(stderr: str) -> list[str]:
    """stderr without make's own `make: *** ...` lines; `make[N]: ***` when make runs nested (make test)."""
    return [line for line in stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]


def assert_finished(run_dir: Path, steps: int) -> None:
    s = summary(run_dir)
    assert s["status"] == "finished" and s["step"] == steps, s
    assert train_steps(run_dir) == list(range(1, steps + 1))
    assert list_checkpoints(run_dir / "checkpoints")[-1].name == f"step_{steps:08d}"
    assert (run_dir / "config.yaml").exists()


def sweep_job_ids(runs_dir: Path, sweep_name: str) -> set[str]:
    """The SLURM array tasks submitit created (folders <array id>_<index>)."""
    return {p.name for p in (runs_dir / sweep_name / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)}


# ---------------------------------------------------------------------------------- against the cluster
@pytest.mark.slurm
@pytest.mark.slow
def test_make_sweep_runs_the_tiny_grid_and_skips_finished_runs(slurm_cluster, data_dir, tmp_path):  # noqa: F811
    runs = tmp_path / "runs"
    args = f"data.cache_dir={data_dir} runs_dir={runs} --interval 2"
    make = ["make", "-s", "sweep", "SWEEP=tiny", f"PYTHON={sys.executable}", "TIME_MIN=10", "GPUS_PER_NODE=0",
            f"ARGS={args}"]
    t0 = time.monotonic()
    proc = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, timeout=240)
    print(f"first sweep: {time.monotonic() - t0:.1f}s\n{proc.stdout}\n{proc.stderr[-3000:]}")
    assert proc.returncode == 0
    assert "4 combinations" in proc.stdout and "all 4 runs finished" in proc.stdout
    lines = progress_lines(proc.stdout)
    assert len(lines) >= 2 and "finished 4" in lines[-1]  # it reported progress while waiting
    assert "squeue:" in lines[0]
    for pe in ("rope", "alibi"):
        for attention in ("regular", "flash"):
            run_dir = runs / "tiny" / f"{pe}-{attention}-s1337"
            assert_finished(run_dir, 4)
            s = summary(run_dir)
            assert (s["pe"], s["attention"], s["sweep"]) == (pe, attention, "tiny")
            assert s["run_name"] == f"{pe}-{attention}-s1337" and s["world_size"] == 1
    jobs = sweep_job_ids(runs, "tiny")
    assert len(jobs) == 4  # one SLURM job per combination (the launcher's job array)
    [script] = {p.read_text() for p in (runs / "tiny" / ".submitit").glob("*/*_submission.sh")}
    assert "--gpus-per-node" not in script and "--ntasks-per-node=1\n" in script  # GPUS_PER_NODE=0: CPU jobs

    t0 = time.monotonic()
    again = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, timeout=120)
    print(f"second sweep: {time.monotonic() - t0:.1f}s\n{again.stdout}")
    assert again.returncode == 0
    # the jobs recorded the config fingerprint the planner computes: nothing is stale
    assert "4 already finished, 0 stale, 0 to run" in again.stdout
    assert sweep_job_ids(runs, "tiny") == jobs  # nothing submitted


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_run_is_requeued_and_resumes_from_its_checkpoint(slurm_cluster, data_dir, tmp_path):  # noqa: F811
    runs, steps = tmp_path / "runs", 40
    run_dir = runs / "preempt" / "rope-flash-s1337"
    cmd = [sys.executable, "-m", "sweeps.run_sweep", "tiny", "sweep_name=preempt", "model/pe=rope",
           "model/attention=flash", f"trainer.max_steps={steps}", "trainer.ckpt_every=5", f"data.cache_dir={data_dir}",
           f"runs_dir={runs}", "--interval", "2"]
    sweep = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: (run_dir / "checkpoints").is_dir() and list_checkpoints(run_dir / "checkpoints"),
                   timeout=120, what="the first checkpoint", poll=0.2)
        job_id = subprocess.run(["squeue", "-h", "-n", "pegrid-preempt", "-o", "%i"], capture_output=True,
                                text=True, check=True).stdout.split()[0]
        # What SLURM sends before the time limit / on preemption: submitit requeues the job.
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, capture_output=True)
        release_requeued(job_id, timeout=60)  # skip the ~120 s requeue hold
        out, _ = sweep.communicate(timeout=180)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    print(out)
    assert sweep.returncode == 0, out
    assert "all 1 runs finished" in out
    log = (run_dir / "train.log").read_text()
    resumed = re.findall(r"resumed from \S+step_(\d+) \(step (\d+)\)", log)
    assert len(resumed) == 1, log  # exactly one restart, from a checkpoint
    resumed_at = int(resumed[0][1])
    assert 0 < resumed_at < steps  # the step USR2 arrived at: the trainer checkpoints it, whatever ckpt_every
    assert_finished(run_dir, steps)  # every step logged exactly once: resumed, not restarted
    assert log.count("run record:") == 1  # the first (preempted) process never reported a result
    job_logs = "".join(p.read_text() for p in (runs / "preempt" / ".submitit").glob("*/*_log.*"))
    assert "Caught signal SIGUSR2" in job_logs
    sacct = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                           text=True).stdout.split()
    assert "REQUEUED" in sacct and sacct[-1] == "COMPLETED", sacct
    print(f"resumed at step {resumed_at}, trained {steps - resumed_at} steps after the requeue")


@pytest.mark.slurm
@pytest.mark.slow
def test_a_failing_job_is_reported_while_the_others_finish(slurm_cluster, data_dir, tmp_path):  # noqa: F811
    runs = tmp_path / "runs"
    # trainer.lr=1e30 makes the loss NaN at step 2 in that job only
    proc = run_sweep("tiny", "sweep_name=fail", "model/pe=rope", "model/attention=regular,flash",
                     "trainer.lr=3e-3,1e30", "run_name=${model.pe.name}-${model.attention.name}-lr${trainer.lr}",
                     f"data.cache_dir={data_dir}", f"runs_dir={runs}", "--interval", "2")
    assert proc.returncode == 1
    assert "2 of 4 runs did not finish" in proc.stdout
    failed = [line for line in proc.stdout.splitlines() if line.strip().startswith("FAILED")]
    assert len(failed) == 2 and all("trainer.lr=1e30" in line and "TrainingDiverged" in line for line in failed)
    for attention in ("regular", "flash"):
        assert_finished(runs / "fail" / f"rope-{attention}-lr0.003", 4)
        bad = summary(runs / "fail" / f"rope-{attention}-lr1e+30")
        assert bad["status"] == "failed" and "training diverged at step 2 (loss nan" in bad["error"]
    assert "failed 2" in progress_lines(proc.stdout)[-1]


@pytest.mark.slurm
@pytest.mark.slow
def test_a_two_task_job_trains_with_ddp(slurm_cluster, data_dir, tmp_path):  # noqa: F811
    """tasks_per_node=2 (what GPUS_PER_NODE=2 gives): src.train exports RANK/WORLD_SIZE/... from SLURM."""
    runs = tmp_path / "runs"
    proc = run_sweep("tiny", "sweep_name=ddp", "model/pe=rope", "model/attention=flash", "trainer.micro_batch_size=2",
                     "hydra.launcher.tasks_per_node=2", f"data.cache_dir={data_dir}", f"runs_dir={runs}",
                     "--interval", "2")
    assert proc.returncode == 0
    run_dir = runs / "ddp" / "rope-flash-s1337"
    assert_finished(run_dir, 4)
    assert summary(run_dir)["world_size"] == 2


@pytest.mark.slurm
@pytest.mark.slow
def test_make_sweep_asking_for_gpus_on_a_cluster_without_any_fails_before_submitting(slurm_cluster, tmp_path):  # noqa: F811
    """The default grid (one GPU per job) on the local cluster, which has no gres: one line, exit 2."""
    runs = tmp_path / "runs"
    proc = subprocess.run(["make", "-s", "sweep", f"PYTHON={sys.executable}", f"ARGS=runs_dir={runs}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 2
    [line] = without_make_errors(proc.stderr)
    assert line.startswith("run_sweep: the jobs ask for 1 GPU(s) per node") and "GPUS_PER_NODE=0" in line
    assert "Traceback" not in proc.stderr and "FAILED" not in proc.stdout
    assert not runs.exists()  # no launch log, no submitit pickles
    assert subprocess.run(["squeue", "-h", "-n", "pegrid-grid"], capture_output=True, text=True).stdout == ""


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_without_an_answering_controller_says_how_to_start_one(slurm_cluster, tmp_path):  # noqa: F811
    """Real scontrol, pointed at a port where no slurmctld listens."""
    conf = tmp_path / "slurm.conf"
    conf.write_text(re.sub(r"(?m)^SlurmctldPort=\d+$", "SlurmctldPort=6999", slurm_cluster.conf.read_text()))
    runs = tmp_path / "runs"
    proc = subprocess.run(["make", "-s", "sweep", "SWEEP=tiny", f"PYTHON={sys.executable}", f"ARGS=runs_dir={runs}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SLURM_CONF": str(conf)})
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 2 and proc.stdout == "" and not runs.exists()
    [line] = without_make_errors(proc.stderr)
    assert "`scontrol ping`: Slurmctld(primary) at" in line and "is DOWN" in line
    assert "scripts/slurm_cluster.sh start" in line


@pytest.mark.slurm
@pytest.mark.slow
def test_squeue_counts_count_every_array_task(slurm_cluster):  # noqa: F811
    """A pending array is one squeue line (JOBID_[0-15]) unless -r: the progress line must say 16."""
    name = f"pegrid-arraycount-{os.getpid()}"
    submitted = subprocess.run(["sbatch", "--hold", "--array=0-15", f"--job-name={name}", "--output=/dev/null",
                                "--wrap", "true"], capture_output=True, text=True, check=True)
    job_id = submitted.stdout.split()[-1]
    try:
        assert sweep_cli.slurm_states(name) == Counter(PENDING=16)
        assert sweep_cli.progress_lines([], name, time.monotonic())[0].endswith("(squeue: 16 pending)")
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
