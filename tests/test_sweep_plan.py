"""sweeps/run_sweep.py without a SLURM cluster: the run dirs of the sweep files (run_sweep's default run_name),
stale finished runs (config fingerprints), experiment=null, the refusal when no SLURM controller answers,
progress lines with steps and ETAs. The last test runs a real
one-run sweep with the local launcher (~30 s); the others take a few seconds in all."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from src.data.prepare import ensure_prepared
from src.training.fingerprint import config_fingerprint
from sweeps import run_sweep
from sweeps.run_sweep import (
    DEFAULT_RUN_NAME,
    SWEEPS_DIR,
    Combo,
    compose_combos,
    load_sweep,
    main,
    progress_lines,
    sweep_overrides,
)
from tests.conftest import ROOT
from tests.train_helpers import compose_train, tiny_overrides

ONE_RUN = ["model/pe=rope", "model/attention=flash"]


def write_record(run_dir: Path, config: dict, **summary) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "summary.json").write_text(json.dumps(summary))


def plan(sweep: str, overrides: list[str]) -> tuple[list[str], list[Combo]]:
    """What run_sweep composes: the fixed overrides of every job and the combinations."""
    return compose_combos(*sweep_overrides(load_sweep(sweep), overrides))


def err_lines(capsys) -> tuple[str, list[str]]:
    out, err = capsys.readouterr()
    return out, err.splitlines()


# ---------------------------------------------------------------------------------- planning
def test_no_sweep_file_repeats_the_default_run_name():
    files = sorted(SWEEPS_DIR.glob("*.yaml"))
    assert files
    for path in files:
        assert DEFAULT_RUN_NAME not in load_sweep(str(path))["overrides"], f"{path.name}: run_sweep adds it"


def test_the_tiny_grid_runs_in_pe_attention_seed_dirs(tmp_path):
    fixed, combos = plan("tiny", [f"runs_dir={tmp_path}"])
    assert [c.run_dir for c in combos] == [tmp_path / "tiny" / f"{pe}-{attention}-s1337"
                                           for pe in ("rope", "alibi") for attention in ("regular", "flash")]
    assert fixed.count(DEFAULT_RUN_NAME) == 1


def test_glob_sweeps_every_yaml_of_a_group_so_a_new_pe_joins_the_grids(tmp_path):
    pe_files = sorted(p.stem for p in (ROOT / "conf" / "model" / "pe").glob("*.yaml"))
    grid = sweep_overrides(load_sweep("grid"), [])[0]
    assert grid["model/pe"] == [pe for pe in pe_files if pe != "nope"]
    assert sweep_overrides(load_sweep("grid_with_nope"), [])[0]["model/pe"] == pe_files
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "conf" / "model" / "pe" / "t5_bias.yaml").touch()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(run_sweep, "ROOT", tmp_path)
        assert "t5_bias" in sweep_overrides(load_sweep("grid"), [])[0]["model/pe"]
    # on the command line too (the comma inside glob() is not a list of values)
    params, _ = sweep_overrides(load_sweep("tiny"), ["model/pe=glob(*,exclude=[nope,learned])"])
    assert params["model/pe"] == [pe for pe in pe_files if pe not in ("nope", "learned")]
    with pytest.raises(run_sweep.SweepError, match="conf/trainer.lr/ is none"):
        sweep_overrides(load_sweep("tiny"), ["trainer.lr=glob(*)"])


@pytest.mark.parametrize(("sweep", "one_run", "run_dir"), [
    ("grid", ["model/pe=rope", "model/attention=flash"], "grid/rope-flash-s1337"),
    ("grid_with_nope", ["model/pe=nope", "model/attention=linformer"], "grid/nope-linformer-s1337"),  # grid's dir
    ("study_cpu", ["model/pe=alibi", "model/attention=linformer_short"], "study_cpu/alibi-linformer-s0"),
])
def test_the_sweep_files_keep_their_run_dirs(sweep, one_run, run_dir, tmp_path):
    """One combination of each (a whole grid takes seconds to compose): the dir it had when each file still
    listed the run_name template itself."""
    _, [combo] = plan(sweep, [*one_run, f"runs_dir={tmp_path}"])
    assert combo.run_dir == tmp_path / run_dir


def test_a_sweep_file_or_the_command_line_may_set_its_own_run_name(tmp_path):
    own = "run_name=${model.attention.name}-only"
    sweep_file = tmp_path / "own.yaml"
    sweep_file.write_text("experiment: null\nlauncher: local\nparams:\n  model/pe: rope\n"
                          f"  model/attention: flash,regular\noverrides:\n  - {own}\n")
    fixed, combos = plan(str(sweep_file), [f"runs_dir={tmp_path}"])
    assert [c.run_dir for c in combos] == [tmp_path / "own" / "flash-only", tmp_path / "own" / "regular-only"]
    assert own in fixed and DEFAULT_RUN_NAME not in fixed
    fixed, [combo] = plan(str(sweep_file), ["model/attention=flash", "run_name=cli", f"runs_dir={tmp_path}"])
    assert combo.run_dir == tmp_path / "own" / "cli" and own not in fixed


def test_experiment_null_means_no_preset_on_the_command_line_and_in_a_sweep_file(tmp_path, capsys):
    default = config_fingerprint(compose_train(ONE_RUN))
    # grid.yaml sets experiment: gpt2_124m_fineweb; experiment=null on the command line drops it
    fixed, [combo] = plan("grid", ["experiment=null", *ONE_RUN, f"runs_dir={tmp_path}"])
    assert combo.fingerprint == default and not any(o.startswith("experiment=") for o in fixed)
    assert main(["grid", "experiment=null", *ONE_RUN, f"runs_dir={tmp_path}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 combinations" in out and "experiment=" not in out

    sweep_file = tmp_path / "nopreset.yaml"
    sweep_file.write_text("experiment: null\nlauncher: local\nparams:\n  model/pe: rope\n  model/attention: flash\n")
    _, [combo] = plan(str(sweep_file), [f"runs_dir={tmp_path}"])
    assert combo.fingerprint == default


def test_a_finished_run_with_another_config_is_stale_and_nothing_is_submitted(tmp_path, capsys):
    args = ["tiny", *ONE_RUN, f"runs_dir={tmp_path}", "--launcher", "local"]
    _, [combo] = plan("tiny", args[1:4])
    write_record(combo.run_dir, combo.config, status="finished", step=4, config_fingerprint=combo.fingerprint)

    assert main([*args, "--dry-run"]) == 0  # the same config: skipped
    assert "1 already finished, 0 stale, 0 to run" in capsys.readouterr().out

    assert main([*args, "trainer.max_steps=6"]) == 2  # changed: listed, refused, nothing launched
    out, err = err_lines(capsys)
    assert "0 already finished, 1 stale, 0 to run" in out
    assert f"stale rope-flash-s1337 (model/pe=rope model/attention=flash): fingerprint {combo.fingerprint} != " in out
    assert "trainer.max_steps 4 -> 6" in out and "$ python" not in out
    assert len(err) == 1 and "--rerun-stale" in err[0] and "nothing submitted" in err[0]
    assert not (tmp_path / "tiny" / ".sweep_logs").exists()

    (combo.run_dir / "summary.json").write_text(json.dumps({"status": "finished", "step": 4}))
    assert main(args) == 2  # a record from before fingerprints is stale too, even with the same settings
    out, err = err_lines(capsys)
    assert "recorded before config fingerprints; config.yaml has the same settings" in out and len(err) == 1

    assert main([*args, "trainer.max_steps=6", "--rerun-stale", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 stale, 1 to run" in out and "$ python -m src.train" in out and "trainer.max_steps=6" in out
    assert (combo.run_dir / "summary.json").exists()  # a dry run moves nothing aside


def test_no_slurm_controller_fails_in_one_line_before_composing_anything(tmp_path, monkeypatch, capsys):
    def composing(*_):
        raise AssertionError("composed the configs before checking for a SLURM controller")

    monkeypatch.setattr(run_sweep, "slurm_launcher", composing)
    monkeypatch.setattr(run_sweep, "compose_combos", composing)
    fake_bin = tmp_path / "bin"  # SLURM installed, its controller down (what scontrol ping prints then)
    fake_bin.mkdir()
    for name, script in {"scontrol": "echo 'Slurmctld(primary) at vm is DOWN'; exit 1", "sbatch": "exit 1",
                         "squeue": "exit 1"}.items():
        (fake_bin / name).write_text(f"#!/bin/sh\n{script}\n")
        (fake_bin / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    assert main(["tiny", f"runs_dir={tmp_path}"]) == 2
    out, err = err_lines(capsys)
    assert out == "" and len(err) == 1
    assert "`scontrol ping`: Slurmctld(primary) at vm is DOWN" in err[0] and "scripts/slurm_cluster.sh start" in err[0]

    monkeypatch.setattr(run_sweep.shutil, "which", lambda cmd: None)  # no SLURM installed at all
    assert main(["grid"]) == 2
    out, err = err_lines(capsys)
    assert len(err) == 1 and "sbatch, squeue, scontrol not found" in err[0] and "slurm_cluster.sh start" in err[0]
    assert not (tmp_path / "tiny").exists()


# ---------------------------------------------------------------------------------- progress
def test_progress_lines_count_interrupted_runs_and_name_running_ones_with_step_and_eta(tmp_path):
    summaries = {
        "a": {"status": "running", "step": 50, "max_steps": 200, "time/elapsed_s": 100.0},
        "b": {"status": "running", "step": 0, "max_steps": 200},  # just started: no rate yet
        "c": {"status": "running", "step": 1000, "max_steps": 19073, "time/elapsed_s": 3600.0},
        "g": {"status": "running", "step": 200, "max_steps": 200, "time/elapsed_s": 400.0},  # evaluating
        "d": {"status": "interrupted", "step": 30, "max_steps": 200, "time/elapsed_s": 60.0},
        "e": {"status": "finished", "step": 200, "max_steps": 200},
        "f": None,  # no record yet
    }
    combos = []
    for name, summary in summaries.items():
        (tmp_path / name).mkdir()
        if summary:
            (tmp_path / name / "summary.json").write_text(json.dumps(summary))
        combos.append(Combo((("model/pe", name),), tmp_path / name))
    lines = progress_lines(combos, None, time.monotonic())
    assert lines[0].endswith("7 runs: pending 1 | running 4 | interrupted 1 | finished 1 | failed 0")
    assert lines[1:] == ["    running a: step 50/200, ETA 5m00s", "    running b: step 0/200, ETA not known yet",
                         "    running c: step 1000/19073, ETA 18h04m", "    running g: step 200/200, final evaluation"]


# ---------------------------------------------------------------------------------- a real sweep
@pytest.mark.slow
def test_local_sweep_jobs_record_the_planners_fingerprint_and_stale_runs_rerun_on_request(tmp_path):
    """One real training (local launcher): a record from before fingerprints is stale until --rerun-stale
    moves it aside and retrains it; the job then records the fingerprint the planner computes (else every
    re-run would call the run stale), and a changed setting makes it stale again."""
    data, runs = tmp_path / "data", tmp_path / "runs"
    ensure_prepared(compose_train(tiny_overrides(data)).data)
    overrides = [*ONE_RUN, f"data.cache_dir={data}", f"runs_dir={runs}", "eval.val.num_tokens=512",
                 "eval.extrapolation.num_tokens=512"]
    _, [combo] = plan("tiny", overrides)
    old = {"status": "finished", "step": 4}
    write_record(combo.run_dir, combo.config, **old)
    logs = runs / "tiny" / ".sweep_logs"

    def sweep(*extra: str) -> subprocess.CompletedProcess:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "sweeps.run_sweep", "tiny", "--launcher", "local", *overrides,
                               "--interval", "5", *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
        print(f"$ run_sweep {' '.join(extra)}: exit {proc.returncode} in {time.monotonic() - t0:.1f}s\n"
              f"{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
        return proc

    refused = sweep()
    assert refused.returncode == 2 and "0 already finished, 1 stale, 0 to run" in refused.stdout
    assert "recorded before config fingerprints" in refused.stdout and len(refused.stderr.splitlines()) == 1
    assert not logs.exists()  # nothing launched

    rerun = sweep("--rerun-stale")
    assert rerun.returncode == 0 and "moved the stale record of rope-flash-s1337" in rerun.stdout
    [moved] = (runs / "tiny" / ".superseded").iterdir()
    assert json.loads((moved / "summary.json").read_text()) == old  # moved aside, not deleted
    new = json.loads((combo.run_dir / "summary.json").read_text())
    assert (new["status"], new["step"], new["config_fingerprint"]) == ("finished", 4, combo.fingerprint)
    rows = [json.loads(line) for line in (combo.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    launches = sorted(logs.iterdir())

    again = sweep()
    assert again.returncode == 0 and "1 already finished, 0 stale, 0 to run" in again.stdout

    changed = sweep("trainer.max_steps=6")
    assert changed.returncode == 2 and "0 already finished, 1 stale, 0 to run" in changed.stdout
    assert "trainer.max_steps 4 -> 6" in changed.stdout and len(changed.stderr.splitlines()) == 1
    assert sorted(logs.iterdir()) == launches  # nothing launched
