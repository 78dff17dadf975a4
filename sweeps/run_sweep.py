"""Submit a sweep file (sweeps/<name>.yaml) as Hydra multirun(s) and report progress until every run ended.

    python -m sweeps.run_sweep SWEEP [overrides...] [--dry-run] [--interval S]

SWEEP is a name in sweeps/ (``grid``, ``tiny``) or a path to a YAML file with the keys ``sweep_name``,
``experiment`` (or null), ``launcher`` (``slurm`` | ``local``, i.e. conf/hydra/launcher/<launcher>.yaml),
``params`` (swept keys -> comma-separated values, Hydra's sweep syntax) and ``overrides`` (a list, the same for
every job). Overrides on the command line come last; one whose key is a swept key replaces its values
(``model/pe=rope,alibi``), one with several values sweeps one more key (``trainer.seed=1,2``: include it in
``run_name``), ``hydra.launcher.*`` overrides configure SLURM. ``--launcher local`` runs the jobs as local
processes (hydra/launcher=local) instead of SLURM jobs.

Each combination's run dir is ``${runs_dir}/${sweep_name}/${run_name}`` (``hydra.sweep.subdir=${run_name}``),
so ``run_name`` must be deterministic and unique per combination. Combinations whose summary.json says
``finished`` are skipped; the rest are launched with ``python -m src.train -m hydra/launcher=<launcher> ...``
(one multirun, or one per value group when a partial grid is left). While they run, a progress line
(pending / running / finished / failed, plus SLURM's job states) is printed every --interval seconds. Exit
status 1 names every run that did not finish.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SWEEPS_DIR = ROOT / "sweeps"
DEFAULT_RUN_NAME = "run_name=${model.pe.name}-${model.attention.name}-s${trainer.seed}"


@dataclass(frozen=True)
class Combo:
    values: tuple[tuple[str, str], ...]  # ((key, value), ...) in params order
    run_dir: Path

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.values)


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
        raise SystemExit(f"sweep file {path} not found (sweeps/: {', '.join(names)})")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - {"sweep_name", "experiment", "launcher", "params", "overrides"}
    if unknown:
        raise SystemExit(f"{path}: unknown keys {sorted(unknown)}")
    spec.setdefault("sweep_name", path.stem)
    spec.setdefault("launcher", "slurm")
    spec["params"] = {str(k): str(v) for k, v in (spec.get("params") or {}).items()}
    spec["overrides"] = [str(o) for o in spec.get("overrides") or []]
    spec["path"] = path
    return spec


def is_sweep_value(value: str) -> bool:
    """Hydra's sweep syntax `a,b,c` (a comma outside brackets/quotes), not a list like `[1,2]`."""
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


def split_values(values: str) -> list[str]:
    return [v.strip() for v in values.split(",") if v.strip()]


def plan(spec: dict, cli_overrides: list[str]) -> tuple[dict[str, list[str]], list[str], list[Combo]]:
    """Swept params, the fixed overrides of every job, and every combination with its run dir."""
    params = {k: split_values(v) for k, v in spec["params"].items()}
    fixed: list[str] = []
    for override in cli_overrides:
        key = override_key(override)
        value = override.split("=", 1)[1] if "=" in override else ""
        if key in params or (not is_hydra_override(override) and is_sweep_value(value)):
            params[key] = split_values(value)  # replaces the file's values, or sweeps one more key
        else:
            fixed.append(override)
    base = [f"sweep_name={spec['sweep_name']}", DEFAULT_RUN_NAME]
    if spec.get("experiment"):
        base.append(f"experiment={spec['experiment']}")
    fixed = merge_overrides(base, spec["overrides"], fixed)

    from hydra import compose, initialize_config_dir

    import src.schemas  # noqa: F401  (as src.train does)

    task_fixed = [o for o in fixed if not is_hydra_override(o)]
    combos: list[Combo] = []
    runs_dir = None
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        for values in itertools.product(*params.values()):
            pairs = tuple(zip(params, values))
            cfg = compose(config_name="train", overrides=merge_overrides(task_fixed, [f"{k}={v}" for k, v in pairs]))
            runs_dir = Path(cfg.runs_dir).absolute()
            combos.append(Combo(pairs, runs_dir / str(cfg.sweep_name) / str(cfg.run_name)))
    dirs = Counter(c.run_dir for c in combos)
    clashes = [str(d) for d, n in dirs.items() if n > 1]
    if clashes:
        raise SystemExit(f"run_name is not unique per combination (runs would share a dir): {clashes}")
    if runs_dir is not None:  # jobs and this process must agree on where the run records are
        fixed = merge_overrides(fixed, [f"runs_dir={runs_dir}"])
    return params, fixed, combos


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


def run_summary(combo: Combo) -> dict:
    from src.training.run_record import RunRecord  # imported late, like the schemas above

    return RunRecord(combo.run_dir).read_summary()


def run_status(combo: Combo) -> str:
    return run_summary(combo).get("status", "pending")


def slurm_states(job_name: str) -> Counter:
    if not shutil.which("squeue"):
        return Counter()
    proc = subprocess.run(["squeue", "-h", "-n", job_name, "-o", "%T"], capture_output=True, text=True)
    return Counter(proc.stdout.split()) if proc.returncode == 0 else Counter()


def progress_line(combos: list[Combo], job_name: str | None, started: float) -> str:
    counts = Counter(run_status(c) for c in combos)
    line = (f"[sweep {time.monotonic() - started:5.0f}s] {len(combos)} runs: pending {counts['pending']} | "
            f"running {counts['running']} | finished {counts['finished']} | failed {counts['failed']}")
    if job_name:
        states = slurm_states(job_name)
        line += "  (squeue: " + (", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "empty") + ")"
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="name of a file in sweeps/ (grid, tiny, ...) or a path to one")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every job / swept values / hydra.launcher.*")
    parser.add_argument("--interval", type=float, default=float(os.environ.get("PEGRID_SWEEP_INTERVAL", 10)),
                        help="seconds between progress lines (default 10)")
    parser.add_argument("--launcher", choices=["slurm", "local"], help="override the sweep file's launcher")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands, submit nothing")
    args = parser.parse_intermixed_args(argv)

    spec = load_sweep(args.sweep)
    params, fixed, combos = plan(spec, args.overrides)
    todo = [c for c in combos if run_status(c) != "finished"]
    sweep_dir = combos[0].run_dir.parent if combos else Path(".")
    name = sweep_dir.name  # the effective sweep_name (the command line may override the file's)
    print(f"sweep {name} ({spec['path']}): {len(combos)} combinations in {sweep_dir}, "
          f"{len(combos) - len(todo)} already finished, {len(todo)} to run", flush=True)
    launches = groups_to_launch(params, todo)
    launcher = args.launcher or spec["launcher"]
    job_name = f"pegrid-{name}" if launcher == "slurm" else None
    commands = [
        [sys.executable, "-m", "src.train", "-m", f"hydra/launcher={launcher}", "hydra.sweep.subdir=${run_name}",
         *fixed, *(f"{k}={','.join(v)}" for k, v in group.items())]
        for group in launches
    ]
    for command in commands:
        print("  $ " + shlex.join(["python", *command[1:]]), flush=True)
    if args.dry_run or not commands:
        return 0

    log_dir = sweep_dir / ".sweep_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    procs = []
    for i, command in enumerate(commands):
        log_path = log_dir / f"{stamp}-launch{i}.log"
        with log_path.open("w") as log:
            procs.append((subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log_path))
    print(f"launched {len(procs)} multirun(s), Hydra/submitit output in {log_dir}", flush=True)

    started = time.monotonic()
    next_print = started
    while any(p.poll() is None for p, _ in procs):
        time.sleep(min(1.0, args.interval))
        if time.monotonic() >= next_print:
            print(progress_line(todo, job_name, started), flush=True)
            next_print = time.monotonic() + args.interval
    print(progress_line(todo, job_name, started), flush=True)

    failed = [c for c in todo if run_status(c) != "finished"]
    if not failed:
        print(f"sweep {name}: all {len(combos)} runs finished", flush=True)
        return 0
    print(f"sweep {name}: {len(failed)} of {len(combos)} runs did not finish:", flush=True)
    for combo in failed:
        error = run_summary(combo).get(
            "error", "no run record (failed before training; see the launch log)")
        print(f"  FAILED {combo.label}: {combo.run_dir}: {error}", flush=True)
    for proc, log_path in procs:
        if proc.returncode:
            tail = log_path.read_text().splitlines()[-15:]
            print(f"--- {log_path} (exit {proc.returncode}), last lines:\n" + "\n".join(tail), flush=True)
    return 1


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
