"""Kill -9 / stop-signal matrix of the trainer's resume contract (issue #13, items 5 and 6).

For each kill point: start `python -m src.train <config> runs_dir=... run_name=<case>`, stop it at that
point (SIGKILL, or SIGTERM / SIGINT / SIGUSR2), rerun the very same command, and compare the finished
record with an uninterrupted run of the same config: `train/loss` at every step and the final `val/loss`,
bit for bit (max abs diff otherwise). Prints one Markdown table (and writes it, with the raw results as
JSON, under --out).

    python scripts/kill_matrix.py --out /tmp/km                      # the whole matrix, tiny model (~10 min)
    python scripts/kill_matrix.py --out /tmp/km --cases mid_interval,sigterm_mid
    python scripts/kill_matrix.py --out /tmp/km --model small --steps 16 --ckpt-every 4   # the default model

How a kill point is reached:
- external: this script polls the run dir (metrics.jsonl, checkpoints/) and signals the process from outside
  once the condition holds; the process is then a little past it, and the table says where it was.
- in-process: the child starts with a `sitecustomize.py` (written to <out>/hook, put first on PYTHONPATH) that
  installs an audit hook (`sys.addaudithook`). At the file operation that marks the point (the rename of
  `.tmp_step_*` into place, the open of the val shard by the final evaluation, ...) the child signals itself,
  so a SIGKILL lands exactly there, as `kill -9` from outside at that instant would. No project code is
  patched; without the KILL_MATRIX_HOOK variable the hook does nothing.
The rerun also runs under the hook, in observe-only mode, to tell whether it evaluated again.

Columns: `killed rc` is the return code of the stopped process (-9: died by SIGKILL; 128+N: exited cleanly
after signal N); `left` is what the stopped process left (summary status, checkpoints, `.tmp_step_*`);
`steps redone` the training steps the rerun computed a second time (logged by the stopped process after
the checkpoint it resumed from); `rerun evaluated` whether the rerun ran an evaluation (seen by the hook's
open of the val shard); `dup rows` steps with more than one training row or more than one val row in
the final metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------- the child's hook
HOOK = r'''
"""kill_matrix hook (scripts/kill_matrix.py): signal this process at one file operation. Inert without
KILL_MATRIX_HOOK."""
import os as _os
import sys as _sys

def _kill_matrix_install(spec):
    import json, re, signal, time
    spec = json.loads(spec)
    observe = spec.get("observe")
    event, path_re = spec.get("event"), re.compile(spec["path"]) if spec.get("path") else None
    mode_re = re.compile(spec["mode"]) if spec.get("mode") else None
    run_dir = spec.get("run_dir")
    state = {"busy": False, "fired": False}

    def note(text):
        if observe:
            fd = _os.open(observe, _os.O_WRONLY | _os.O_APPEND | _os.O_CREAT, 0o644)
            _os.write(fd, (text + "\n").encode())
            _os.close(fd)

    def rows():
        try:
            with open(_os.path.join(run_dir, "metrics.jsonl")) as f:
                lines = f.read().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def condition_holds():
        when = spec.get("when")
        if not when:
            return True
        if when == "last_row_is_eval":
            r = rows()
            return bool(r) and "val/loss" in r[-1]
        if when.startswith("ckpt_exists:"):
            return _os.path.isdir(_os.path.join(run_dir, "checkpoints", when.split(":", 1)[1]))
        if when.startswith("step_at_least:"):
            steps = [x["step"] for x in rows() if "train/loss" in x]
            return bool(steps) and max(steps) >= int(when.split(":", 1)[1])
        raise ValueError(when)

    def children():
        pids = []
        for tid in _os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/children") as f:
                    pids += f.read().split()
            except OSError:
                pass
        return pids

    def hook(name, args):
        if state["busy"] or state["fired"]:
            return
        if name not in ("open", "os.rename", "shutil.rmtree"):
            return
        paths = []
        for arg in args[: 2 if name == "os.rename" else 1]:  # a rename matches by its source or its target
            try:
                paths.append(_os.fsdecode(arg))
            except TypeError:
                pass
        if not paths:
            return
        target = paths[0]
        state["busy"] = True
        try:
            if observe and name == "open" and re.search(r"/val_\d+\.bin$", target):
                note("eval " + target)
            if observe and name == "os.rename" and len(paths) > 1 and re.search(r"/(train|val)_\d+\.bin$", paths[1]):
                note("shard " + paths[1])
            if name != event or not path_re or not any(path_re.search(t) for t in paths):
                return
            if name == "open" and mode_re and not mode_re.search(str(args[1] or "")):
                return
            if not condition_holds():
                return
            state["fired"] = True
            note("fired %s %s children=%s" % (name, target, ",".join(children())))
            for i, sig in enumerate(spec.get("signals", [])):
                if i:
                    time.sleep(0.05)  # lets the Python-level handler run between two signals
                _os.kill(_os.getpid(), getattr(signal, sig))
            if spec.get("signals"):
                time.sleep(0.05)  # a Python-level handler runs here, inside the audited operation
        finally:
            state["busy"] = False

    _sys.addaudithook(hook)

if _os.environ.get("KILL_MATRIX_HOOK"):
    _kill_matrix_install(_os.environ["KILL_MATRIX_HOOK"])
'''


# --------------------------------------------------------------------------------------------- the cases
@dataclass
class Case:
    name: str
    point: str  # the kill point, in words
    how: str  # "external" | "in-process" | "none"
    signals: list[str] = field(default_factory=lambda: ["SIGKILL"])
    # in-process: the audited operation ("open" | "os.rename" | "shutil.rmtree"), a regex on its path, on the
    # open mode, and a condition on the run dir ("last_row_is_eval", "ckpt_exists:step_X", "step_at_least:N")
    event: str | None = None
    path: str | None = None
    mode: str | None = None
    when: str | None = None
    # external: signal once metrics.jsonl has a training row at step >= at_step, or once a checkpoint dir exists
    at_step: int | None = None
    at_ckpt: int | None = None
    fresh_data: bool = False  # prepare the data again in a fresh cache dir (small shards), so prep can be hit
    extra: list[str] = field(default_factory=list)  # more overrides (both runs)


def ckpt(step: int) -> str:
    return f"step_{step:08d}"


def build_cases(steps: int, every: int) -> list[Case]:
    assert steps >= 3 * every, "--steps must allow at least two checkpoints before the final one"
    first, second = every, 2 * every
    mid = second + every // 2  # between the second and the third checkpoint
    prep_shard = r"/train_000001\.bin$"  # the rename that makes the second train shard visible
    return [
        Case("prep_kill9", "during data prep (1 of n train shards written)", "in-process", event="os.rename",
             path=prep_shard, fresh_data=True),
        Case("prep_kill9_num_proc2", "during data prep, data.num_proc=2 (forked tokenizer workers)", "in-process",
             event="os.rename", path=prep_shard, fresh_data=True, extra=["data.num_proc=2"]),
        Case("before_first_ckpt", f"before the first checkpoint (step >= {first // 2})", "external",
             at_step=max(1, first // 2)),
        Case("mid_interval", f"mid-interval (step >= {mid})", "external", at_step=mid),
        Case("ckpt_write_weights", f"checkpoint {second} write: weights written, config + state not",
             "in-process", event="open", path=rf"/\.tmp_{ckpt(second)}/model_config\.json$", mode="w"),
        Case("ckpt_write_before_rename", f"checkpoint {second} write: .tmp complete, not renamed", "in-process",
             event="os.rename", path=rf"/\.tmp_{ckpt(second)}$"),
        Case("ckpt_after_rename_before_prune", f"checkpoint {3 * every}: renamed, oldest not yet pruned",
             "in-process", event="shutil.rmtree", path=rf"/{ckpt(first)}$"),
        Case("right_after_ckpt", f"right after checkpoint {second} appeared", "external", at_ckpt=second),
        Case("final_ckpt_write", f"final checkpoint {steps} write: .tmp complete, not renamed", "in-process",
             event="os.rename", path=rf"/\.tmp_{ckpt(steps)}$"),
        Case("final_eval", "during the final evaluation (val shard opened)", "in-process", event="open",
             path=r"/val_\d+\.bin$", when=f"ckpt_exists:{ckpt(steps)}"),
        Case("after_final_eval_row", "after the final val row, before summary says finished", "in-process",
             event="open", path=r"/summary\.json$", mode="r", when="last_row_is_eval"),
        Case("sigterm_mid", f"SIGTERM mid-interval (step >= {mid})", "external", signals=["SIGTERM"], at_step=mid),
        Case("sigint_mid", f"SIGINT mid-interval (step >= {mid})", "external", signals=["SIGINT"], at_step=mid),
        Case("sigusr2_mid", f"SIGUSR2 mid-interval (step >= {mid})", "external", signals=["SIGUSR2"], at_step=mid),
        Case("sigint_twice_mid", f"SIGINT twice inside step {mid + 1} (at its metrics write)", "in-process",
             signals=["SIGINT", "SIGINT"], event="open", path=r"/metrics\.jsonl$", mode="a",
             when=f"step_at_least:{mid}"),
        Case("sigterm_ckpt_write", f"SIGTERM during checkpoint {second} write (before rename)", "in-process",
             signals=["SIGTERM"], event="os.rename", path=rf"/\.tmp_{ckpt(second)}$"),
        Case("sigterm_final_eval", "SIGTERM during the final evaluation", "in-process", signals=["SIGTERM"],
             event="open", path=r"/val_\d+\.bin$", when=f"ckpt_exists:{ckpt(steps)}"),
        Case("sigterm_prep", "SIGTERM during data prep", "in-process", signals=["SIGTERM"], event="os.rename",
             path=prep_shard, fresh_data=True),
        Case("finished_rerun", "none: rerun of a finished run", "none", signals=[]),
    ]


# --------------------------------------------------------------------------------------------- reading records
def read_rows(run_dir: Path) -> list[dict]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def read_summary(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def train_steps(rows: list[dict]) -> list[int]:
    return [r["step"] for r in rows if "train/loss" in r]


def checkpoint_names(run_dir: Path) -> tuple[list[str], list[str]]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return [], []
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    return [n for n in names if n.startswith("step_")], [n for n in names if n.startswith(".tmp")]


def compare(run_dir: Path, ref: dict[str, object]) -> dict:
    rows = read_rows(run_dir)
    train: dict[int, list[float]] = {}
    for r in rows:
        if "train/loss" in r:
            train.setdefault(r["step"], []).append(r["train/loss"])
    vals = [r for r in rows if "val/loss" in r]
    ref_train: dict[int, float] = ref["train"]
    dups = sorted(s for s, v in train.items() if len(v) > 1) + (["val"] if len(vals) > 1 else [])
    missing = sorted(set(ref_train) - set(train))
    diffs = [abs(train[s][-1] - ref_train[s]) for s in ref_train if s in train]
    first_off = next((s for s in sorted(ref_train) if s in train and train[s][-1] != ref_train[s]), None)
    val = vals[-1]["val/loss"] if vals else None
    return {
        "train_exact": not missing and first_off is None and set(train) == set(ref_train),
        "train_max_abs_diff": max(diffs) if diffs else None, "first_step_off": first_off, "missing_steps": missing,
        "val": val, "val_exact": val == ref["val"],
        "val_abs_diff": abs(val - ref["val"]) if val is not None and ref["val"] is not None else None,
        "dup_rows": dups, "val_rows": len(vals),
    }


# --------------------------------------------------------------------------------------------- running
class Runner:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).resolve()
        self.runs = self.out / "runs"
        self.logs = self.out / "logs"
        self.hook_dir = self.out / "hook"
        for d in (self.runs, self.logs, self.hook_dir):
            d.mkdir(parents=True, exist_ok=True)
        (self.hook_dir / "sitecustomize.py").write_text(HOOK)
        self.data_dir = Path(args.data_dir).resolve() if args.data_dir else self.out / "data"

    def overrides(self, case: Case | None) -> list[str]:
        a = self.args
        over = [f"model={a.model}", f"trainer.max_steps={a.steps}", f"trainer.ckpt_every={a.ckpt_every}",
                "trainer.log_every=1", "trainer.progress=false", "logger=none", *a.override]
        if case is not None and case.fresh_data:
            # a fresh cache dir and small shards, so that preparing takes several shard writes; the token
            # stream is the same, so the run must still match the reference bit for bit
            over += [f"data.cache_dir={self.fresh_data_dir(case)}", f"data.shard_tokens={a.prep_shard_tokens}"]
        else:
            over += [f"data.cache_dir={self.data_dir}"]
        return over + (case.extra if case else [])

    def fresh_data_dir(self, case: Case) -> Path:
        return self.out / "data_fresh" / case.name

    def command(self, name: str, case: Case | None) -> list[str]:
        return [sys.executable, "-m", "src.train", f"runs_dir={self.runs}", f"run_name={name}",
                *self.overrides(case)]

    def env(self, spec: dict | None) -> dict:
        env = dict(os.environ)
        if spec is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.hook_dir), env.get("PYTHONPATH")) if p)
            env["KILL_MATRIX_HOOK"] = json.dumps(spec)
        return env

    def launch(self, name: str, case: Case | None, spec: dict | None, log_name: str) -> subprocess.Popen:
        log = open(self.logs / f"{log_name}.log", "w")
        return subprocess.Popen(self.command(name, case), cwd=ROOT, env=self.env(spec), stdout=log,
                                stderr=subprocess.STDOUT)

    def wait(self, proc: subprocess.Popen) -> int:
        try:
            return proc.wait(timeout=self.args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -999  # reported as a timeout

    def reference(self, name: str) -> dict:
        run_dir = self.runs / name
        if not (read_summary(run_dir).get("status") == "finished"):
            shutil.rmtree(run_dir, ignore_errors=True)
            started = time.monotonic()
            rc = self.wait(self.launch(name, None, None, name))
            print(f"# {name}: rc {rc}, {time.monotonic() - started:.0f} s", file=sys.stderr)
        rows = read_rows(run_dir)
        vals = [r["val/loss"] for r in rows if "val/loss" in r]
        return {"train": {r["step"]: r["train/loss"] for r in rows if "train/loss" in r},
                "val": vals[-1] if vals else None, "status": read_summary(run_dir).get("status")}

    def run_case(self, case: Case, ref: dict) -> dict:
        run_dir = self.runs / case.name
        shutil.rmtree(run_dir, ignore_errors=True)
        if case.fresh_data:  # emptied once: the rerun must continue the preparation the stopped process began
            shutil.rmtree(self.fresh_data_dir(case), ignore_errors=True)
        observe = self.logs / f"{case.name}.events"
        observe.unlink(missing_ok=True)
        spec = None
        if case.how == "in-process":
            spec = {"event": case.event, "path": case.path, "mode": case.mode, "when": case.when,
                    "signals": case.signals, "run_dir": str(run_dir), "observe": str(observe)}
        started = time.monotonic()
        proc = self.launch(case.name, case, spec, f"{case.name}.1")
        external_at = None
        if case.how == "external":
            external_at = self.poll_and_signal(proc, run_dir, case)
        killed_rc = self.wait(proc)
        fired = [line for line in observe.read_text().splitlines() if line.startswith("fired")] \
            if observe.exists() else []
        children = re.findall(r"children=(\S*)", fired[0])[0].split(",") if fired and "children=" in fired[0] else []
        orphans = self.surviving([int(c) for c in children if c])
        rows_before = read_rows(run_dir)
        logged = train_steps(rows_before)
        left_status = read_summary(run_dir).get("status")
        prep_left = sorted(p.name for p in self.fresh_data_dir(case).glob("*/*") if p.is_file()) \
            if case.fresh_data else []
        ckpts, tmps = checkpoint_names(run_dir)

        rerun_observe = self.logs / f"{case.name}.rerun.events"
        rerun_observe.unlink(missing_ok=True)
        rerun = self.launch(case.name, case, {"observe": str(rerun_observe)}, f"{case.name}.2")
        rerun_rc = self.wait(rerun)
        rerun_log = (self.logs / f"{case.name}.2.log").read_text(errors="replace")
        m = re.search(r"resumed from \S+ \(step (\d+)\)", rerun_log)
        resumed = None if "nothing to do" in rerun_log else int(m.group(1)) if m else 0  # None: already finished
        rerun_events = rerun_observe.read_text().splitlines() if rerun_observe.exists() else []
        evaluated = any(line.startswith("eval") for line in rerun_events)
        shards_by_rerun = sum(line.startswith("shard") for line in rerun_events)
        result = compare(run_dir, ref)
        ckpts_after, tmps_after = checkpoint_names(run_dir)
        last_logged = max(logged) if logged else 0
        redone = max(0, last_logged - (resumed if resumed is not None else self.args.steps))
        return {
            "case": case.name, "point": case.point, "how": case.how, "signals": case.signals,
            "hit": bool(fired) if case.how == "in-process" else (external_at is not None or case.how == "none"),
            "external_at_step": external_at, "killed_rc": killed_rc, "left_status": left_status,
            "left_ckpts": ckpts, "left_tmp": tmps, "children_at_kill": [c for c in children if c],
            "orphans_after_kill": orphans, "prep_left": prep_left, "shards_by_rerun": shards_by_rerun,
            "last_logged_step": last_logged,
            "resumed_from": resumed, "steps_redone": redone, "eval_in_rerun": evaluated, "rerun_rc": rerun_rc,
            "rerun_locked_out": "RunDirLocked" in rerun_log or "is in use by" in rerun_log,
            "rerun_traceback": "Traceback" in rerun_log,
            "final_status": read_summary(run_dir).get("status"), "ckpts_after": ckpts_after, "tmp_after": tmps_after,
            "seconds": round(time.monotonic() - started, 1), **result,
        }

    def poll_and_signal(self, proc: subprocess.Popen, run_dir: Path, case: Case) -> int | None:
        """Wait for the case's condition, signal the process; return the last logged step at that moment."""
        while proc.poll() is None:
            steps = train_steps(read_rows(run_dir))
            hit = (case.at_step is not None and steps and max(steps) >= case.at_step) or \
                  (case.at_ckpt is not None and (run_dir / "checkpoints" / ckpt(case.at_ckpt)).is_dir())
            if hit:
                for i, sig in enumerate(case.signals):
                    if i:
                        time.sleep(0.05)
                    proc.send_signal(getattr(signal, sig))
                return max(steps) if steps else 0
            time.sleep(0.005)
        return None

    @staticmethod
    def surviving(pids: list[int], grace: float = 5.0) -> list[int]:
        """Which of pids are still alive (not zombies) after `grace` seconds."""
        deadline = time.monotonic() + grace
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [p for p in alive if _alive(p)]
        return alive


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------------------------- the table
def fmt_rc(rc: int | None) -> str:
    if rc is None:
        return "?"
    if rc == -999:
        return "TIMEOUT"
    if rc < 0:
        return f"{rc} ({signal.Signals(-rc).name})"
    if rc > 128 and rc - 128 in {s.value for s in signal.Signals}:
        return f"{rc} (128+{signal.Signals(rc - 128).name})"
    return str(rc)


def table(results: list[dict], ref_b: dict | None) -> str:
    head = ("| kill point | how | killed rc | left behind | resumed from | steps redone | rerun evaluated | rerun rc "
            "| final status | dup rows | train/loss vs uninterrupted | val/loss |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        status = f"status {r['left_status']}" if r["left_status"] else "no summary.json"
        left = f"{status}; ckpts {','.join(c[5:].lstrip('0') for c in r['left_ckpts']) or '-'}"
        if r["prep_left"]:
            shards = [n for n in r["prep_left"] if n.endswith(".bin")]
            left += (f"; data: {len(shards)} shards" + (", progress.json" if "progress.json" in r["prep_left"] else "")
                     + (", meta.json" if "meta.json" in r["prep_left"] else "")
                     + f"; the rerun wrote {r['shards_by_rerun']} more")
        if r["left_tmp"]:
            left += f"; {','.join(r['left_tmp'])}"
        if r["children_at_kill"]:
            left += (f"; {len(r['children_at_kill'])} child processes at the kill, "
                     + (f"**alive 5 s later: {r['orphans_after_kill']}**" if r["orphans_after_kill"] else "all gone"))
        if not r["hit"]:
            left = "**point not hit** " + left
        if r["external_at_step"] is not None:
            left = f"signalled at step {r['external_at_step']}; " + left
        exact = "exact" if r["train_exact"] else (
            f"**off from step {r['first_step_off']}, max {r['train_max_abs_diff']:.3g}**"
            + (f" missing {r['missing_steps']}" if r["missing_steps"] else ""))
        val = "exact" if r["val_exact"] else f"**{r['val']} (diff {r['val_abs_diff']})**"
        rerun = fmt_rc(r["rerun_rc"]) + (" locked out" if r["rerun_locked_out"] else "") + \
            (" traceback" if r["rerun_traceback"] else "")
        resumed = r["resumed_from"] if r["resumed_from"] is not None else "finished: nothing to do"
        lines.append(
            f"| {r['point']} | {r['how']} {'+'.join(r['signals']) or ''} | {fmt_rc(r['killed_rc'])} | {left} "
            f"| {resumed} | {r['steps_redone']} "
            f"| {'yes' if r['eval_in_rerun'] else 'no'} | {rerun} | {r['final_status']} "
            f"| {', '.join(map(str, r['dup_rows'])) or 'none'} | {exact} | {val} |")
    if ref_b is not None:
        lines.append(f"| control: a second uninterrupted run | none | - | - | - | - | - | - | {ref_b['status']} | "
                     f"none | {'exact' if ref_b['exact'] else '**off: ' + str(ref_b['max']) + '**'} "
                     f"| {'exact' if ref_b['val_exact'] else '**off**'} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "kill_matrix"),
                   help="work dir: runs/, logs/, hook/, data/, matrix.md, matrix.json")
    p.add_argument("--data-dir", help="shard cache dir of the reference and most cases (default <out>/data)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--ckpt-every", type=int, default=8)
    p.add_argument("--prep-shard-tokens", type=int, default=20000,
                   help="data.shard_tokens of the data-prep cases (several shards, so prep can be hit)")
    p.add_argument("--override", action="append", default=[],
                   help="one more Hydra override for every run (repeatable)")
    p.add_argument("--tiny-batch", action=argparse.BooleanOptionalAction, default=True,
                   help="with --model tiny: 256-token steps in 2 micro-batches, a small evaluation")
    p.add_argument("--cases", help="comma-separated case names (default: all)")
    p.add_argument("--no-control", action="store_true", help="skip the second uninterrupted run")
    p.add_argument("--timeout", type=float, default=900, help="seconds per process")
    args = p.parse_args()
    if args.model == "tiny" and args.tiny_batch:
        args.override = ["trainer.total_batch_tokens=256", "trainer.micro_batch_size=4", "trainer.warmup_steps=4",
                         "eval.val.num_tokens=4096", "eval.extrapolation.multipliers=[1,2]",
                         "eval.extrapolation.num_tokens=4096", *args.override]

    runner = Runner(args)
    cases = build_cases(args.steps, args.ckpt_every)
    if args.cases:
        wanted = args.cases.split(",")
        unknown = set(wanted) - {c.name for c in cases}
        if unknown:
            p.error(f"unknown cases {sorted(unknown)}; known: {', '.join(c.name for c in cases)}")
        cases = [c for c in cases if c.name in wanted]
    ref = runner.reference("reference")
    if ref["status"] != "finished":
        print(f"the reference run did not finish; see {runner.logs / 'reference.log'}", file=sys.stderr)
        return 1
    ref_b = None
    if not args.no_control:
        control = runner.reference("reference_b")
        cmp_b = [abs(control["train"][s] - ref["train"][s]) for s in ref["train"] if s in control["train"]]
        ref_b = {"status": control["status"], "exact": control["train"] == ref["train"],
                 "max": max(cmp_b) if cmp_b else None, "val_exact": control["val"] == ref["val"]}
    results = []
    for case in cases:
        r = runner.run_case(case, ref)
        print(f"# {case.name}: {r['seconds']} s, killed rc {r['killed_rc']}, resumed from {r['resumed_from']}, "
              f"exact {r['train_exact']}/{r['val_exact']}", file=sys.stderr)
        results.append(r)
    md = table(results, ref_b)
    config = " ".join(runner.overrides(None)[:-1])
    header = f"Config: `{config}`; reference val/loss {ref['val']!r}, {len(ref['train'])} steps.\n\n"
    (runner.out / "matrix.md").write_text(header + md + "\n")
    (runner.out / "matrix.json").write_text(json.dumps({"reference": ref, "control": ref_b, "results": results},
                                                       indent=1, default=str))
    print(header + md)
    bad = [r["case"] for r in results if not (r["train_exact"] and r["val_exact"] and not r["dup_rows"]
                                              and r["final_status"] == "finished" and r["hit"])]
    if bad:
        print(f"\nnot exact / not finished / duplicated / point missed: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
