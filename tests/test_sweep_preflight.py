"""`run_sweep --preflight` (sweeps/preflight.py): every combination to run trains 2 steps, one after another in
one job with the array's resources, and the array is submitted only if all pass.

No cluster: the preflight's configs are the real runs' but for PREFLIGHT_KEYS, --dry-run shows it and runs nothing
(SLURM resources included), how a check's outcome is read, and two real local preflights: (a) the tiny sweep,
all pass, then the array is launched; (b) one combination diverges at step 2 (a real failure at run time, past
composing and src/preflight.py's checks: every PE/attention constraint is checked when the modules are built,
so a diverging learning rate is what fails only while training): refused, exit 2, nothing launched.
(c) needs the local SLURM cluster (markers slurm + slow): the preflight is exactly one SLURM job, with the
array's sbatch options, and the array is submitted after it ended.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from src.data.prepare import ensure_prepared
from src.structured import dotted_leaves
from sweeps import preflight as pf
from sweeps import run_sweep
from tests.conftest import ROOT
from tests.slurm_helpers import slurm_cluster  # noqa: F401  (a fixture)
from tests.train_helpers import compose_train, tiny_overrides


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The tiny model's data, tokenised once (every check and run of this module reads it)."""
    path = tmp_path_factory.mktemp("preflight_data")
    ensure_prepared(compose_train(tiny_overrides(path)).data)
    return path


def plan_of(argv: list[str]) -> run_sweep.Plan:
    return run_sweep.plan_sweep(run_sweep.parse_args(argv))


def flat_config(overrides: list[str]) -> dict:
    from omegaconf import OmegaConf

    return dotted_leaves(OmegaConf.to_container(compose_train(overrides), resolve=True))


def lr_sweep(tmp_path: Path) -> Path:
    """1 PE x 1 attention x 2 learning rates: lr=1e30 makes the loss NaN at step 2 (TrainingDiverged)."""
    path = tmp_path / "lr.yaml"
    path.write_text("""\
sweep_name: lr
experiment: null
launcher: local
params:
  model/pe: rope
  model/attention: flash
  trainer.lr: 3e-3,1e30
overrides:
  - run_name=${model.pe.name}-${model.attention.name}-lr${trainer.lr}
  - model=tiny
  - trainer.max_steps=4
  - trainer.total_batch_tokens=128
  - trainer.micro_batch_size=4
  - trainer.warmup_steps=1
  - trainer.log_every=1
  - trainer.progress=false
  - eval=offline
  - eval.val.num_tokens=2048
  - eval.extrapolation.multipliers=[1,2]
""")
    return path


class LaunchSpy:
    """Stands in for run_sweep.launch/monitor/report: records what would be launched, and when."""

    def __init__(self, monkeypatch, capsys, allowed: bool):
        self.calls, self.capsys, self.allowed = [], capsys, allowed
        monkeypatch.setattr(run_sweep, "launch", self.launch)
        monkeypatch.setattr(run_sweep, "monitor", lambda *a: None)
        monkeypatch.setattr(run_sweep, "report", lambda *a: 0)

    def launch(self, plan, commands, jobs):
        assert self.allowed, "launched after a failed preflight"
        out = self.capsys.readouterr()
        print(out.out, end="")
        print(out.err, end="", file=sys.stderr)
        self.calls.append({"commands": commands, "printed_before": out.out,
                           "preflight_dir_left": (plan.sweep_dir / pf.PREFLIGHT_DIR).exists()})


# ---------------------------------------------------------------------------------- no training
@pytest.mark.parametrize(("sweep", "one_run", "changed"), [
    ("tiny", [], {"trainer.max_steps", "trainer.ckpt_every", "trainer.keep_last", "eval.val.num_tokens",
                  "eval.extrapolation.num_tokens"}),  # tiny evaluates only at the end, with logger=none already
    ("grid", ["model/pe=alibi", "model/attention=linformer"], set(pf.PREFLIGHT_KEYS)),  # W&B, HellaSwag, 124M
])
def test_the_preflight_runs_the_real_runs_configs_but_for_steps_eval_checkpoints_and_run_dir(
        sweep, one_run, changed, tmp_path):
    plan = plan_of([sweep, *one_run, f"runs_dir={tmp_path}", "--dry-run"])
    checks = pf.checks_for(plan, plan.sweep_dir / pf.PREFLIGHT_DIR)
    assert [c.name for c in checks] == [c.run_dir.name for c in plan.todo] and plan.todo
    for check, combo in zip(checks, plan.todo):
        run_dir = check.overrides[-1]
        assert run_dir == f"hydra.run.dir={plan.sweep_dir / '.preflight' / combo.run_dir.name}"
        preflight, real = flat_config(list(check.overrides[:-1])), dotted_leaves(combo.resolved)
        differ = {k for k in {**real, **preflight} if real.get(k, "absent") != preflight.get(k, "absent")}
        assert differ == changed, differ
        assert preflight["trainer.max_steps"] == pf.PREFLIGHT_STEPS and preflight["trainer.eval_every"] == 0
    if sweep == "grid":  # each evaluation on one full batch: 8 windows of 1024 (+1), the 8x window, 4 items
        assert (preflight["eval.val.num_tokens"], preflight["eval.extrapolation.num_tokens"]) == (8193, 8193)
        assert preflight["eval.hellaswag.limit"] == 4 and preflight["logger.mode"] == "offline"
        assert preflight["trainer.compile"] is True and preflight["data.name"] == "fineweb_edu"  # as the runs


def test_dry_run_shows_the_preflight_job_with_the_arrays_slurm_resources_and_runs_nothing(tmp_path, capsys):
    argv = ["tiny", f"runs_dir={tmp_path}", "hydra.launcher.partition=gpu", "hydra.launcher.account=proj",
            "++hydra.launcher.additional_parameters={constraint:a100}", "--preflight", "--dry-run"]
    assert run_sweep.main(argv) == 0  # --dry-run: no SLURM needed
    out = capsys.readouterr().out
    [job] = [line for line in out.splitlines() if line.startswith("preflight: ")]
    assert "4 combination(s) x 2 steps, one after another in one SLURM job (pegrid-tiny-preflight:" in job
    assert "partition=gpu, account=proj" in job and "'constraint': 'a100'" in job and "time limit 23 min" in job
    commands = [line for line in out.splitlines() if line.startswith("  preflight $ python -m src.train ")]
    assert len(commands) == 4 and all("trainer.max_steps=2" in c and "/tiny/.preflight/" in c for c in commands)
    assert not (tmp_path / "tiny").exists()  # nothing run, nothing written

    assert run_sweep.main([*argv, "--preflight-timeout", "7"]) == 0
    assert "time limit 7 min" in capsys.readouterr().out
    assert run_sweep.main(["tiny", f"runs_dir={tmp_path}", "--preflight-timeout", "7", "--dry-run"]) == 2
    assert "--preflight-timeout sets the time limit of --preflight" in capsys.readouterr().err


def test_the_slurm_job_gets_the_arrays_settings_mapped_as_the_hydra_launcher_maps_them(tmp_path):
    plan = plan_of(["grid", "model/pe=rope", "model/attention=flash", f"runs_dir={tmp_path}", "--dry-run",
                    "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=8", "hydra.launcher.tasks_per_node=8",
                    "++hydra.launcher.additional_parameters={constraint:h100}"])
    params = pf.slurm_executor_params(pf.launcher_params("slurm", plan.fixed), "pegrid-grid-preflight", 16.5)
    assert params["slurm_partition"] == "gpu" and params["slurm_additional_parameters"] == {"constraint": "h100"}
    assert (params["gpus_per_node"], params["tasks_per_node"], params["cpus_per_task"]) == (8, 8, 8)
    assert params["slurm_setup"] == ["export OMP_NUM_THREADS=8"] and params["slurm_signal_delay_s"] == 120
    assert (params["name"], params["timeout_min"]) == ("pegrid-grid-preflight", 17)
    assert not {"slurm_max_num_timeout", "slurm_array_parallelism", "submitit_folder"} & set(params)
    import submitit

    submitit.AutoExecutor(folder=tmp_path / "s", cluster="slurm").update_parameters(**params)  # all known to it


@pytest.mark.parametrize(("returncode", "summary", "output", "expected"), [
    (0, {"status": "finished", "step": 2}, "", ("ok", None)),
    (1, {"status": "failed", "error": "TrainingDiverged: training diverged at step 2 (loss nan)\nmore"}, "",
     ("failed", "TrainingDiverged: training diverged at step 2 (loss nan)")),
    (2, {}, "[log] composing\nerror: data.path=/x: no such file\n", ("failed", "data.path=/x: no such file")),
    (1, {"status": "running", "step": 1}, "Traceback (most recent call last):\n  File ...\ntorch.OutOfMemoryError: "
     "CUDA out of memory. Tried to allocate 2.00 GiB\n\nSet the environment variable HYDRA_FULL_ERROR=1 for a "
     "complete stack trace.\n", ("failed", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")),
    (-9, {"status": "running"}, "step 1\n", ("failed", "killed by SIGKILL after: step 1")),
])
def test_a_checks_outcome_is_its_records_error_or_the_first_line_that_says_what_failed(returncode, summary, output,
                                                                                       expected):
    assert pf.outcome(returncode, False, 3.0, summary, output) == expected
    status, error = pf.outcome(-15, True, 61.0, {"step": 1}, "")
    assert status == "failed" and error.startswith("timed out after 61 s (step 1 of 2)")
    assert "--preflight-timeout" in error


# ---------------------------------------------------------------------------------- real local preflights
@pytest.mark.slow
def test_a_local_preflight_of_the_tiny_sweep_passes_then_the_array_is_launched(data_dir, tmp_path, monkeypatch,
                                                                               capsys):
    """Two of the tiny grid's combinations (the 4 would take twice as long; one after another either way)."""
    spy = LaunchSpy(monkeypatch, capsys, allowed=True)
    argv = ["tiny", "--launcher", "local", "--preflight", "--interval", "2", "model/attention=flash",
            f"data.cache_dir={data_dir}", f"runs_dir={tmp_path}"]
    expected = run_sweep.multirun_commands(plan_of(argv), None)
    t0 = time.monotonic()
    assert run_sweep.main(argv) == 0
    print(f"preflight + launch: {time.monotonic() - t0:.1f} s")
    [call] = spy.calls  # launched once, the sweep's own multirun, after the preflight
    assert call["commands"] == expected and not call["preflight_dir_left"]
    out = call["printed_before"]
    assert "preflight: 2 combination(s) x 2 steps, one after another in one local process" in out
    assert re.search(r"^\[preflight +\d+s\] 2 combinations: ok \d", out, re.M)  # progress while waiting
    assert "preflight: 2 of 2 combination(s) passed" in out
    for pe in ("rope", "alibi"):
        assert re.search(rf"^  ok +{pe}-flash-s1337 \(model/pe={pe} model/attention=flash\): \d+\.\d s$", out, re.M)
    sweep_dir = tmp_path / "tiny"
    assert not (sweep_dir / ".preflight").exists()  # the throw-away run dirs are gone
    [logs] = (sweep_dir / ".sweep_logs").glob("*-preflight")
    assert {p.name for p in logs.iterdir()} == {"preflight.log", "rope-flash-s1337.log", "alibi-flash-s1337.log"}
    assert "run record: " in (logs / "rope-flash-s1337.log").read_text()
    assert sorted(p.name for p in sweep_dir.iterdir()) == [".sweep_logs"]  # no run dir, no checkpoint kept


@pytest.mark.slow
def test_a_combination_that_fails_at_run_time_is_named_and_nothing_is_launched(data_dir, tmp_path, monkeypatch,
                                                                               capsys):
    LaunchSpy(monkeypatch, capsys, allowed=False)
    argv = [str(lr_sweep(tmp_path)), "--preflight", "--interval", "2", f"data.cache_dir={data_dir}",
            f"runs_dir={tmp_path / 'runs'}"]
    t0 = time.monotonic()
    assert run_sweep.main(argv) == 2
    print(f"refused preflight: {time.monotonic() - t0:.1f} s")
    out, err = capsys.readouterr()
    print(out, err)
    assert "preflight: 1 of 2 combination(s) passed" in out
    assert re.search(r"^  ok +rope-flash-lr0\.003 \(model/pe=rope model/attention=flash trainer\.lr=3e-3\)", out, re.M)
    [failed] = [line for line in out.splitlines() if line.startswith("  FAILED")]
    assert "rope-flash-lr1e+30 (model/pe=rope model/attention=flash trainer.lr=1e30)" in failed
    assert "TrainingDiverged: training diverged at step 2 (loss nan" in failed
    [line] = err.splitlines()  # the refusal: one line naming the combination and its error
    assert line.startswith("run_sweep: the preflight failed for 1 of 2 combination(s) (model/pe=rope "
                           "model/attention=flash trainer.lr=1e30: TrainingDiverged: training diverged at step 2")
    assert "nothing submitted" in line and "Traceback" not in out + err
    sweep_dir = tmp_path / "runs" / "lr"
    assert sorted(p.name for p in sweep_dir.iterdir()) == [".sweep_logs"]  # no run dir, no multirun
    [logs] = (sweep_dir / ".sweep_logs").iterdir()  # only the preflight's, no launch log
    assert logs.name.endswith("-preflight") and str(logs) in line
    assert "training diverged at step 2" in (logs / "rope-flash-lr1e+30.log").read_text()


# ---------------------------------------------------------------------------------- on the local SLURM cluster
def sacct_jobs(name: str, since: str) -> list[dict]:
    fields = ["JobID", "JobName", "State", "Submit", "Start", "End"]
    proc = subprocess.run(["sacct", "-n", "-X", "-P", "-S", since, f"--name={name}", "-o", ",".join(fields)],
                          capture_output=True, text=True, check=True)
    return [dict(zip(fields, line.split("|"))) for line in proc.stdout.splitlines() if line.strip()]


def sbatch_options(script: Path) -> dict[str, str]:
    options = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script.read_text(), re.M))
    return {k: v for k, v in options.items() if k not in ("output", "error")}  # paths, %j vs %A_%a


@pytest.mark.slurm
@pytest.mark.slow
def test_on_slurm_the_preflight_is_one_job_with_the_arrays_resources_then_the_array_is_submitted(
        slurm_cluster, data_dir, tmp_path):  # noqa: F811
    name, since = f"pf{int(time.time())}", time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 5))
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "sweeps.run_sweep", "tiny", f"sweep_name={name}", "model/attention=flash",
           "--preflight", "--interval", "2", f"data.cache_dir={data_dir}", f"runs_dir={runs}"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    print(f"preflight + sweep on SLURM: {time.monotonic() - t0:.1f} s\n{proc.stdout}\n{proc.stderr[-3000:]}")
    assert proc.returncode == 0
    out = proc.stdout
    assert f"one SLURM job (pegrid-{name}-preflight: partition=" not in out  # tiny sets no partition
    assert f"one SLURM job (pegrid-{name}-preflight: nodes=1, tasks_per_node=1, cpus_per_task=1" in out
    assert re.search(rf"preflight: started SLURM job \d+ \(pegrid-{name}-preflight\)", out)
    assert re.search(r"^\[preflight +\d+s\] .*\(squeue: 1 (pending|running)\)$", out, re.M)
    assert "preflight: 2 of 2 combination(s) passed" in out and "all 2 runs finished" in out
    assert out.index("preflight: 2 of 2") < out.index("launched 1 of 1 multirun(s)")

    [pre] = sacct_jobs(f"pegrid-{name}-preflight", since)  # exactly one preflight job ...
    assert pre["State"] == "COMPLETED"
    array = sacct_jobs(f"pegrid-{name}", since)
    assert len(array) == 2 and all(j["State"] == "COMPLETED" for j in array)
    assert all(j["Submit"] >= pre["End"] for j in array), (pre, array)  # ... ended before the array was submitted

    sweep_dir = runs / name
    [pre_script] = (sweep_dir / ".sweep_logs").glob("*-preflight/submitit/*_submission.sh")
    [array_script] = {p.read_text(): p for p in (sweep_dir / ".submitit").glob("*/*_submission.sh")}.values()
    pre_opts, array_opts = sbatch_options(pre_script), sbatch_options(array_script)
    assert pre_opts.pop("job-name") == f"pegrid-{name}-preflight" and array_opts.pop("job-name") == f"pegrid-{name}"
    assert pre_opts.pop("time") == str(pf.default_timeout_min(2)) and array_opts.pop("time") == "10"
    assert array_opts.pop("array").startswith("0-1")
    assert pre_opts == array_opts  # cpus, nodes, tasks, signal, gres/partition/account when set: the same
    assert all("export OMP_NUM_THREADS=1" in p.read_text() for p in (pre_script, array_script))  # the setup lines
    assert not (sweep_dir / ".preflight").exists()
    for pe in ("rope", "alibi"):
        assert json.loads((sweep_dir / f"{pe}-flash-s1337" / "summary.json").read_text())["status"] == "finished"


@pytest.mark.slurm
@pytest.mark.slow
def test_on_slurm_a_two_task_preflight_trains_each_combination_with_ddp(slurm_cluster, data_dir, tmp_path,  # noqa: F811
                                                                        monkeypatch, capsys):
    """tasks_per_node=2 (GPUS_PER_NODE=2): every check runs on both tasks as one DDP run, the two checks one after
    the other on the job's one rendezvous port (the launch is the spy's: the preflight is what is tested)."""
    spy = LaunchSpy(monkeypatch, capsys, allowed=True)
    argv = ["tiny", "sweep_name=pfddp", "model/pe=rope", "model/attention=regular,flash", "trainer.micro_batch_size=2",
            "hydra.launcher.tasks_per_node=2", "--preflight", "--interval", "2", f"data.cache_dir={data_dir}",
            f"runs_dir={tmp_path}"]
    t0 = time.monotonic()
    assert run_sweep.main(argv) == 0
    print(f"two-task preflight: {time.monotonic() - t0:.1f} s")
    [call] = spy.calls
    out = call["printed_before"]
    assert "tasks_per_node=2" in out and "preflight: 2 of 2 combination(s) passed" in out
    [logs] = (tmp_path / "pfddp" / ".sweep_logs").glob("*-preflight")
    for name in ("rope-regular-s1337", "rope-flash-s1337"):
        assert "x world_size 2 x" in (logs / f"{name}.log").read_text()  # rank 0's log
        assert (logs / f"{name}.rank1.log").is_file()
