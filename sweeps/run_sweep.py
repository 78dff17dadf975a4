"""Submit a sweep file (sweeps/<name>.yaml) as Hydra multirun(s) and report progress until every run ended.

    python -m sweeps.run_sweep SWEEP [overrides...] [--dry-run] [--rerun-stale] [--interval S]
                               [--launcher local [--jobs N]] [--preflight [--preflight-timeout MIN]]

SWEEP is a name in sweeps/ (``grid``, ``tiny``) or a path to a YAML file with the keys ``sweep_name``,
``experiment`` (or null), ``launcher`` (``slurm`` | ``local``, i.e. conf/hydra/launcher/<launcher>.yaml),
``params`` (swept keys -> comma-separated values, Hydra's sweep syntax) and ``overrides`` (a list, the same for
every job). Overrides on the command line come last; one whose key is a swept key replaces its values
(``model/pe=rope,alibi``), one with several values sweeps one more key (``trainer.seed=1,2``: include it in
``run_name``), ``hydra.launcher.*`` overrides configure SLURM (``hydra.launcher.gpus_per_node=0``: CPU jobs,
no GPU requested). ``--launcher local`` runs the jobs as local processes (hydra/launcher=local) instead of
SLURM jobs, all at once; with ``--jobs N`` at most N at a time (each combination its own process).

Each combination's run dir is ``${runs_dir}/${sweep_name}/${run_name}`` (``hydra.sweep.subdir=${run_name}``),
so ``run_name`` must be deterministic and unique per combination: every sweep gets DEFAULT_RUN_NAME, which a
sweep file's ``overrides`` or the command line may replace. A combination whose summary.json says
``finished`` with the config fingerprint of its composed config is skipped; a finished one with another (or
no) fingerprint is *stale*: the sweep lists it and submits nothing, unless ``--rerun-stale`` moves its record
to ``<sweep dir>/.superseded/`` and trains it again. The rest are launched with ``python -m src.train -m
hydra/launcher=<launcher> ...`` (one multirun, or one per value group when a partial grid is left). Before
that, for SLURM: a controller must answer and, if the jobs ask for GPUs, the cluster must have some. While
the jobs run, a progress line (pending / running / interrupted / finished / failed, SLURM's job states, the
running runs' steps and ETAs) is printed every --interval seconds. Exit status 1 names every run that did not
finish; 2 is a refusal before anything was submitted (one line on stderr).

``--preflight`` (sweeps/preflight.py) first trains every combination to run for 2 steps, one after another in one
short job with the array's own resources (one SLURM job; with ``--launcher local`` a local process), with the
same composed configs but for steps, evaluation budget, checkpoints and run dir; only if every one passes is the
sweep submitted, else a refusal (exit 2) names each failing combination and its error. With ``--dry-run`` it
shows what the preflight would run and runs nothing.

The phases, in `sweep`: plan (`plan_sweep`, `show_plan`, `multirun_commands`: every refusal happens here), the
optional preflight (`Preflight.run`: a failure is a refusal too), launch (`launch`, the `Multiruns` queue),
monitor (`monitor`, `progress_lines`) and report (`report`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SWEEPS_DIR = ROOT / "sweeps"
# the one place the sweeps' run_name is set (conf/train.yaml's default has a timestamp: not resumable)
DEFAULT_RUN_NAME = "run_name=${model.pe.name}-${model.attention.name}-s${trainer.seed}"
STATUSES = ("pending", "running", "interrupted", "finished", "failed")  # summary.json status (pending: none yet)
START_SLURM = ("start a local one with `sudo scripts/slurm_cluster.sh start` (docs/SLURM_LOCAL.md), or run the "
               "jobs as local processes with --launcher local (make sweep-local)")


class SweepError(Exception):
    """A refusal before anything is submitted: main prints it as one line and exits 2."""


@dataclass(frozen=True)
class Combo:
    values: tuple[tuple[str, str], ...]  # ((key, value), ...) in params order
    run_dir: Path
    fingerprint: str = ""  # config_fingerprint of the composed config, what the job's summary.json will say
    config: dict = field(default_factory=dict, compare=False, repr=False)  # its results_config
    resolved: dict = field(default_factory=dict, compare=False, repr=False)  # the whole composed config, resolved

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.values)


# ------------------------------------------------------------------------------ the sweep file and its overrides
def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def is_hydra_override(override: str) -> bool:
    key = override_key(override)
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def merge_overrides(*groups: list[str]) -> list[str]:
    """Later overrides of the same key replace earlier ones (Hydra would reject some duplicates)."""
    merged: dict[str, str] = {}
    for group in groups:
        for override in group:
            merged.pop(override_key(override), None)
            merged[override_key(override)] = override
    return list(merged.values())


def load_sweep(sweep: str) -> dict:
    path = Path(sweep)
    if not path.suffix:
        path = SWEEPS_DIR / f"{sweep}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
        raise SweepError(f"sweep file {path} not found (sweeps/: {', '.join(names)})")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SweepError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    unknown = set(spec) - {"sweep_name", "experiment", "launcher", "params", "overrides"}
    if unknown:
        raise SweepError(f"{path}: unknown keys {sorted(unknown)}")
    spec.setdefault("sweep_name", path.stem)
    spec.setdefault("launcher", "slurm")
    spec["params"] = {str(k): str(v) for k, v in (spec.get("params") or {}).items()}
    spec["overrides"] = [str(o) for o in spec.get("overrides") or []]
    spec["path"] = path
    return spec


def is_sweep_value(value: str) -> bool:
    """Hydra's sweep syntax `a,b,c` (a comma outside brackets/quotes; not a list like `[1,2]`) or `glob(...)`."""
    if value.strip().startswith("glob("):
        return True
    depth, quote = 0, None
    for ch in value:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            return True
    return False


def sweep_values(key: str, values: str) -> list[str]:
    """The values of `key=a,b,c`; for a config group, Hydra's `glob(*)` / `glob(*,exclude=nope)` is every
    conf/<group>/*.yaml it matches, so a new PE or attention file joins such a sweep with no edit here."""
    if values.strip().startswith("glob("):
        group_dir = ROOT / "conf" / key
        if not group_dir.is_dir():
            raise SweepError(f"{key}={values}: glob() selects options of a config group, and conf/{key}/ is none")
        from hydra.core.override_parser.overrides_parser import OverridesParser

        return OverridesParser.create().parse_override(f"{key}={values}").value().filter(
            sorted(p.stem for p in group_dir.glob("*.yaml")))
    return [v.strip() for v in values.split(",") if v.strip()]


def sweep_overrides(spec: dict, cli_overrides: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Swept params and the fixed overrides of every job: DEFAULT_RUN_NAME, then the sweep file, then the
    command line (a later override of the same key replaces an earlier one)."""
    params = {k: sweep_values(k, v) for k, v in spec["params"].items()}
    fixed: list[str] = []
    for override in cli_overrides:
        key = override_key(override)
        value = override.split("=", 1)[1] if "=" in override else ""
        if key in params or (not is_hydra_override(override) and is_sweep_value(value)):
            params[key] = sweep_values(key, value)  # replaces the file's values, or sweeps one more key
        else:
            fixed.append(override)
    base = [f"sweep_name={spec['sweep_name']}"]
    if spec.get("experiment"):
        base.append(f"experiment={spec['experiment']}")
    fixed = merge_overrides([*base, DEFAULT_RUN_NAME], spec["overrides"], fixed)
    # experiment=null means no preset, conf/train.yaml's default, but Hydra rejects null for a config group
    return params, [o for o in fixed if not (override_key(o) == "experiment" and o.split("=", 1)[-1] == "null")]


# ------------------------------------------------------------------------------ plan: compose, check, sort
def one_line(err: BaseException) -> str:
    """Hydra's messages span lines (options, search path) and keep the reason in __cause__: first lines only."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    cause = err.__cause__ and one_line(err.__cause__)
    return f"{text}: {cause}" if cause else text


def compose_combos(params: dict[str, list[str]], fixed: list[str]) -> tuple[list[str], list[Combo]]:
    """Every combination composed (Hydra compose API, nothing is trained), and `fixed` with runs_dir absolute."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    import src.schemas  # noqa: F401  (as src.train does)
    from src.training.fingerprint import config_fingerprint, results_config

    task_fixed = [o for o in fixed if not is_hydra_override(o)]
    combos: list[Combo] = []
    runs_dir = None
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        for values in itertools.product(*params.values()):
            pairs = tuple(zip(params, values))
            overrides = merge_overrides(task_fixed, [f"{k}={v}" for k, v in pairs])
            try:
                cfg = compose(config_name="train", overrides=overrides)
                resolved = OmegaConf.to_container(cfg, resolve=True)
                fingerprint, config = config_fingerprint(resolved), results_config(resolved)
            except (HydraException, OmegaConfBaseException, ValueError) as err:  # Hydra raises all three
                label = " ".join(f"{k}={v}" for k, v in pairs)
                raise SweepError(f"cannot compose the config of {label or 'the sweep'}: {one_line(err)}") from None
            runs_dir = Path(cfg.runs_dir).absolute()
            combos.append(Combo(pairs, runs_dir / str(cfg.sweep_name) / str(cfg.run_name), fingerprint, config,
                                resolved))
    dirs = Counter(c.run_dir for c in combos)
    clashes = [str(d) for d, n in dirs.items() if n > 1]
    if clashes:
        raise SweepError(f"run_name is not unique per combination (runs would share a dir): {clashes}")
    if runs_dir is not None:  # jobs and this process must agree on where the run records are
        fixed = merge_overrides(fixed, [f"runs_dir={runs_dir}"])
    return fixed, combos


def slurm_launcher(fixed: list[str]) -> tuple[list[str], dict]:
    """The SLURM launcher settings the jobs will get (conf/hydra/launcher/slurm.yaml + overrides), and `fixed`
    with gpus_per_node=0 turned into no GPU request: submitit would pass --gpus-per-node=0, and slurm.yaml's
    tasks_per_node (= gpus_per_node) would be 0; a CPU job is one task."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    import src.schemas  # noqa: F401  (the launcher node is composed with the train config)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        try:
            cfg = compose(config_name="train", overrides=["hydra/launcher=slurm", *fixed], return_hydra_config=True)
            settings = {k: OmegaConf.select(cfg.hydra.launcher, k) for k in ("gpus_per_node", "tasks_per_node",
                                                                               "partition")}
        except (HydraException, OmegaConfBaseException, ValueError) as err:
            raise SweepError(f"cannot compose the SLURM launcher settings: {one_line(err)}") from None
    if settings["gpus_per_node"] == 0:
        tasks = settings["tasks_per_node"] or 1
        fixed = merge_overrides(fixed, ["hydra.launcher.gpus_per_node=null", f"hydra.launcher.tasks_per_node={tasks}"])
        settings.update(gpus_per_node=None, tasks_per_node=tasks)
    return fixed, settings


def check_slurm_controller() -> None:
    """Refuse at once (before anything is composed) when there is no SLURM to submit to."""
    missing = [cmd for cmd in ("sbatch", "squeue", "scontrol") if not shutil.which(cmd)]
    if missing:
        raise SweepError(f"SLURM's {', '.join(missing)} not found on PATH: no cluster to submit to; {START_SLURM}")
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60)
        answer = next((line.strip() for line in (ping.stdout + ping.stderr).splitlines() if line.strip()), "")
        up = " is UP" in ping.stdout  # one answering controller is enough (a backup may be down)
    except subprocess.TimeoutExpired:
        answer, up = "no answer in 60 s", False
    if not up:
        raise SweepError(f"no SLURM controller answers (`scontrol ping`: {answer or 'nothing'}); {START_SLURM}")


def check_gpus(settings: dict) -> None:
    """Jobs that ask for GPUs on a cluster without any would be refused by sbatch one by one: refuse them now."""
    gpus, partition = settings["gpus_per_node"], settings["partition"]
    if not gpus:
        return
    cmd = ["sinfo", "-h", "-o", "%G", *(["-p", str(partition)] if partition else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return  # sbatch will say what is wrong with the partition
    gres = sorted(set(proc.stdout.split()))
    if not any(re.match(r"gpu(:|\(|$)", g) for line in gres for g in line.split(",")):
        where = f"partition {partition}" if partition else "the cluster"
        raise SweepError(
            f"the jobs ask for {gpus} GPU(s) per node (hydra.launcher.gpus_per_node={gpus}) but {where} has no GPUs "
            f"(`{shlex.join(cmd)}`: {', '.join(gres) or 'no nodes'}); nothing submitted. For CPU jobs set "
            f"GPUS_PER_NODE=0 (make) or hydra.launcher.gpus_per_node=0, or choose a GPU partition: PARTITION=...")


def run_summary(combo: Combo) -> dict:
    from src.run_record import RunRecord  # imported late, like the schemas above

    return RunRecord(combo.run_dir).read_summary()


def run_status(combo: Combo) -> str:
    return run_summary(combo).get("status", "pending")


ABSENT = object()  # a key one of two configs lacks


def short(value) -> str:
    text = "(absent)" if value is ABSENT else json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def stale_reason(combo: Combo, limit: int = 3) -> str | None:
    """Why a finished run's record answers another config than its combination's now, or None if it does not.
    The fingerprint decides; the record's config.yaml only explains (its first few differing keys)."""
    from src.structured import dotted_leaves
    from src.training.fingerprint import FINGERPRINT_KEY, results_config

    recorded = run_summary(combo).get(FINGERPRINT_KEY)
    if recorded == combo.fingerprint:
        return None
    why = f"fingerprint {recorded} != {combo.fingerprint}" if recorded else "recorded before config fingerprints"
    try:
        old = dotted_leaves(results_config(yaml.safe_load((combo.run_dir / "config.yaml").read_text()) or {}))
    except (OSError, yaml.YAMLError):
        return f"{why}; no readable config.yaml to compare"
    new = dotted_leaves(combo.config)
    keys = [k for k in {**new, **old} if old.get(k, ABSENT) != new.get(k, ABSENT)]
    if not keys:
        return f"{why}; config.yaml has the same settings"
    shown = ", ".join(f"{k} {short(old.get(k, ABSENT))} -> {short(new.get(k, ABSENT))}" for k in keys[:limit])
    return f"{why}: {shown}" + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


@dataclass
class Plan:
    """Every combination of a sweep, sorted by what its run record says."""
    path: Path  # the sweep file
    launcher: str  # conf/hydra/launcher/<launcher>.yaml
    params: dict[str, list[str]]  # the swept keys and their values
    fixed: list[str]  # the overrides of every job (runs_dir absolute)
    combos: list[Combo]
    finished: list[Combo]  # stale ones included
    stale: dict[Combo, str]  # finished under another config -> how it differs
    todo: list[Combo]  # what the launch trains: not finished, or stale with --rerun-stale

    @property
    def sweep_dir(self) -> Path:
        return self.combos[0].run_dir.parent if self.combos else Path(".")

    @property
    def name(self) -> str:
        return self.sweep_dir.name  # the effective sweep_name (the command line may override the file's)

    @property
    def job_name(self) -> str | None:
        return f"pegrid-{self.name}" if self.launcher == "slurm" else None  # what submitit names the jobs


def plan_sweep(args: argparse.Namespace) -> Plan:
    """Compose every combination of the sweep and sort them (finished, stale, to run). Without --dry-run a
    SLURM sweep first needs a controller (checked before anything is composed) and, for GPU jobs, GPUs."""
    spec = load_sweep(args.sweep)
    launcher = args.launcher or spec["launcher"]
    if launcher == "slurm" and not args.dry_run:
        check_slurm_controller()
    params, fixed = sweep_overrides(spec, args.overrides)
    if launcher == "slurm":
        fixed, settings = slurm_launcher(fixed)
        if not args.dry_run:
            check_gpus(settings)
    fixed, combos = compose_combos(params, fixed)
    finished = [c for c in combos if run_status(c) == "finished"]
    stale = {c: reason for c in finished if (reason := stale_reason(c))}
    todo = [c for c in combos if c not in finished or (c in stale and args.rerun_stale)]
    return Plan(spec["path"], launcher, params, fixed, combos, finished, stale, todo)


def show_plan(plan: Plan, rerun_stale: bool) -> None:
    """The counts and the stale runs; stale runs are a refusal unless --rerun-stale."""
    print(f"sweep {plan.name} ({plan.path}): {len(plan.combos)} combinations in {plan.sweep_dir}, "
          f"{len(plan.finished) - len(plan.stale)} already finished, {len(plan.stale)} stale, "
          f"{len(plan.todo)} to run", flush=True)
    for combo, reason in plan.stale.items():
        print(f"  stale {combo.run_dir.name} ({combo.label}): {reason}", flush=True)
    if plan.stale and not rerun_stale:
        raise SweepError(
            f"{len(plan.stale)} finished run(s) of sweep {plan.name} do not match the current config (listed "
            f"above); nothing submitted. Rerun them with --rerun-stale (make sweep ARGS=--rerun-stale), which moves "
            f"their records to {plan.sweep_dir / '.superseded'}/, or restore the old settings")


def groups_to_launch(params: dict[str, list[str]], todo: list[Combo]) -> list[dict[str, list[str]]]:
    """Cover the combinations still to run with as few cartesian multiruns as this simple scheme gives:
    the whole grid if nothing is done, else one multirun per value of the other keys, sweeping the first."""
    keys = list(params)
    if len(todo) == len(list(itertools.product(*params.values()))):
        return [params] if todo else []
    by_rest: dict[tuple[str, ...], list[str]] = {}
    for combo in todo:
        values = dict(combo.values)
        by_rest.setdefault(tuple(values[k] for k in keys[1:]), []).append(values[keys[0]])
    return [{keys[0]: firsts, **dict(zip(keys[1:], rest))} for rest, firsts in by_rest.items()]


def multirun_commands(plan: Plan, jobs: int | None) -> list[list[str]]:
    """The `python -m src.train -m ...` commands that train plan.todo. With --jobs (local only): a queue of
    one-combination multiruns, each run inside its process (Hydra's basic launcher)."""
    launches, launcher = groups_to_launch(plan.params, plan.todo), plan.launcher
    if jobs is not None:
        if launcher != "local" or jobs < 1:
            raise SweepError(f"--jobs {jobs}: give a positive number of local processes, with --launcher local")
        launches, launcher = [{key: [value] for key, value in combo.values} for combo in plan.todo], "basic"
    return [[sys.executable, "-m", "src.train", "-m", f"hydra/launcher={launcher}", "hydra.sweep.subdir=${run_name}",
             *plan.fixed, *(f"{k}={','.join(v)}" for k, v in group.items())] for group in launches]


# ------------------------------------------------------------------------------ launch
class Multiruns:
    """The multirun processes, started in order while fewer than `limit` run; each logs to its own file."""

    def __init__(self, commands: list[list[str]], log_dir: Path, limit: int):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.queued = [(command, log_dir / f"{stamp}-launch{i}.log") for i, command in enumerate(commands)]
        self.started: list[tuple[subprocess.Popen, Path]] = []
        self.limit = limit

    def running(self) -> int:
        return sum(proc.poll() is None for proc, _ in self.started)

    def start_queued(self) -> None:
        while self.queued and self.running() < self.limit:
            command, log_path = self.queued.pop(0)
            with log_path.open("w") as log:
                proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            self.started.append((proc, log_path))

    def done(self) -> bool:
        return not self.queued and self.running() == 0

    def failed(self) -> list[tuple[subprocess.Popen, Path]]:
        return [(proc, log_path) for proc, log_path in self.started if proc.returncode]


def launch(plan: Plan, commands: list[list[str]], jobs: int | None) -> Multiruns:
    """Move the stale records aside (--rerun-stale), then start the multiruns (at most --jobs at once)."""
    from src.run_record import RunRecord

    for combo in plan.stale:
        print(f"  moved the stale record of {combo.run_dir.name} to {RunRecord(combo.run_dir).move_aside()}",
              flush=True)
    log_dir = plan.sweep_dir / ".sweep_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    multiruns = Multiruns(commands, log_dir, jobs or len(commands))
    multiruns.start_queued()
    print(f"launched {len(multiruns.started)} of {len(commands)} multirun(s), Hydra/submitit output in {log_dir}",
          flush=True)
    return multiruns


# ------------------------------------------------------------------------------ monitor
def slurm_states(job_name: str) -> Counter:
    """Job states by count; -r lists every array task (without it a pending array is one line)."""
    if not shutil.which("squeue"):
        return Counter()
    proc = subprocess.run(["squeue", "-h", "-r", "-n", job_name, "-o", "%T"], capture_output=True, text=True)
    return Counter(proc.stdout.split()) if proc.returncode == 0 else Counter()


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def step_and_eta(summary: dict) -> str:
    """From summary.json, which the trainer updates at every logged step: seconds per step so far (over all
    attempts, like the step count) times the steps left."""
    step, total, elapsed = summary.get("step"), summary.get("max_steps"), summary.get("time/elapsed_s")
    text = f"step {step if step is not None else '?'}/{total if total is not None else '?'}"
    if step and total and step >= total:
        return f"{text}, final evaluation"
    if step and total and elapsed:
        return f"{text}, ETA {duration(elapsed / step * max(total - step, 0))}"
    return f"{text}, ETA not known yet"


def progress_lines(combos: list[Combo], job_name: str | None, started: float) -> list[str]:
    """The counts line, then one indented line per running run."""
    summaries = [(combo, run_summary(combo)) for combo in combos]
    counts = Counter(s.get("status", "pending") for _, s in summaries)
    line = (f"[sweep {time.monotonic() - started:5.0f}s] {len(combos)} runs: "
            + " | ".join(f"{status} {counts[status]}" for status in STATUSES))
    if job_name:
        states = slurm_states(job_name)
        line += "  (squeue: " + (", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "empty") + ")"
    return [line] + [f"    running {combo.run_dir.name}: {step_and_eta(s)}"
                     for combo, s in summaries if s.get("status") == "running"]


def monitor(plan: Plan, multiruns: Multiruns, interval: float) -> None:
    """Until every multirun ended: start queued ones as others end, print progress every `interval` seconds."""
    started = next_print = time.monotonic()
    while not multiruns.done():
        time.sleep(min(1.0, interval))
        multiruns.start_queued()
        if time.monotonic() >= next_print:
            print("\n".join(progress_lines(plan.todo, plan.job_name, started)), flush=True)
            next_print = time.monotonic() + interval
    print("\n".join(progress_lines(plan.todo, plan.job_name, started)), flush=True)


# ------------------------------------------------------------------------------ report
def not_finished_reason(summary: dict) -> str:
    if not summary:
        return "no run record (failed before training; see the launch log)"
    if summary.get("error"):
        return summary["error"]
    return f"status {summary.get('status')} at step {summary.get('step')} (the job ended without a word: see its log)"


def report(plan: Plan, multiruns: Multiruns) -> int:
    """0 if every run finished; else 1, naming each run that did not, with the tail of each failed multirun's log."""
    failed = [c for c in plan.todo if run_status(c) != "finished"]
    if not failed:
        print(f"sweep {plan.name}: all {len(plan.combos)} runs finished", flush=True)
        return 0
    print(f"sweep {plan.name}: {len(failed)} of {len(plan.combos)} runs did not finish:", flush=True)
    for combo in failed:
        print(f"  FAILED {combo.label}: {combo.run_dir}: {not_finished_reason(run_summary(combo))}", flush=True)
    for proc, log_path in multiruns.failed():
        tail = log_path.read_text().splitlines()[-15:]
        print(f"--- {log_path} (exit {proc.returncode}), last lines:\n" + "\n".join(tail), flush=True)
    return 1


# ------------------------------------------------------------------------------ the command
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="name of a file in sweeps/ (grid, tiny, ...) or a path to one")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every job / swept values / hydra.launcher.*")
    parser.add_argument("--interval", type=float, default=float(os.environ.get("PEGRID_SWEEP_INTERVAL", 10)),
                        help="seconds between progress lines (default 10)")
    parser.add_argument("--launcher", choices=["slurm", "local"], help="override the sweep file's launcher")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands, submit nothing")
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="with --launcher local: at most N runs at once, one process each (default: all at once)")
    parser.add_argument("--rerun-stale", action="store_true",
                        help="move the records of finished runs whose config changed to .superseded/ and rerun them")
    parser.add_argument("--preflight", action="store_true",
                        help="first train every combination to run for 2 steps, one after another in one short job "
                             "with the sweep's resources (SLURM, or a local process with --launcher local); submit "
                             "only if all pass (docs/SWEEPS.md)")
    parser.add_argument("--preflight-timeout", type=float, metavar="MIN",
                        help="the preflight job's time limit in minutes (default 15 + 2 per combination)")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return sweep(args)
    except SweepError as err:
        print(f"run_sweep: {err}", file=sys.stderr, flush=True)
        return 2


def sweep(args: argparse.Namespace) -> int:
    """Plan (every refusal, a SweepError, comes before anything is launched), with --preflight the preflight
    (sweeps/preflight.py: a failed one is a refusal too), launch, monitor, report."""
    if args.preflight_timeout is not None and not args.preflight:
        raise SweepError("--preflight-timeout sets the time limit of --preflight: give both")
    plan = plan_sweep(args)
    show_plan(plan, args.rerun_stale)
    commands = multirun_commands(plan, args.jobs)
    for command in commands:
        print("  $ " + shlex.join(["python", *command[1:]]), flush=True)
    preflight = None
    if args.preflight and commands:
        from sweeps.preflight import Preflight

        preflight = Preflight(plan, args.jobs, args.preflight_timeout)
        preflight.show(commands=args.dry_run)
    if args.dry_run or not commands:
        return 0
    if preflight is not None:
        preflight.run(args.interval)  # every combination for a few steps in one job; a SweepError unless all pass
    multiruns = launch(plan, commands, args.jobs)
    monitor(plan, multiruns, args.interval)
    return report(plan, multiruns)


if __name__ == "__main__":
    # run the imported module, not this __main__ copy: sweeps.preflight raises sweeps.run_sweep.SweepError
    from sweeps.run_sweep import main as module_main

    sys.exit(module_main())
