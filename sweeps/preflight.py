"""The preflight of a sweep (`run_sweep --preflight`): every combination still to run trains for a few steps, one
after another, inside ONE short job with the array's own resources, before the array is submitted.

Submitter side (`Preflight`, called by run_sweep.sweep between plan and launch):

- `checks_for(plan)`: per combination, the `python -m src.train` overrides of its real job (the sweep's fixed
  task overrides, then its swept values: the same composed config) followed by `preflight_overrides`, which
  changes only the keys in PREFLIGHT_KEYS: PREFLIGHT_STEPS optimizer steps, the evaluation at the end only and
  each of its parts (val loss, extrapolation, HellaSwag) on one full batch, the final checkpoint only, a
  W&B logger offline (throw-away runs must not join the sweep's W&B group), and the run dir
  `<sweep dir>/.preflight/<run_name>/` (hydra.run.dir), removed after.
- SLURM: one submitit job on the SLURM launcher's settings as composed for the array (conf/hydra/launcher/
  slurm.yaml + the sweep's and the command line's `hydra.launcher.*`: partition, account, qos, gpus, tasks,
  cpus, mem, constraint and every other sbatch option, setup lines), mapped to submitit as
  hydra-submitit-launcher maps them, except: job name `pegrid-<sweep>-preflight`, time limit
  `--preflight-timeout` (default 15 + 2 per combination minutes), no requeue. Local (`--launcher local`): a
  local subprocess (`python -m sweeps.preflight <spec.json>`), with CUDA_VISIBLE_DEVICES as submitit_local
  sets it for the real runs (not with --jobs, whose runs are plain processes).
- While it runs, a progress line every --interval seconds (from `.preflight/progress.json`, which the job
  rewrites after every combination); then one line per combination (ok / FAILED / NOT RUN, seconds, peak CUDA
  memory of the training steps, the first line of its error). All ok: the array is submitted. Else a
  SweepError (exit 2, nothing submitted) naming every failing combination and its error. `.preflight/` is
  removed either way; the logs (each combination's output, the job's) stay in
  `<sweep dir>/.sweep_logs/<time>-preflight/`, beside the launch logs.

Job side (`run_checks`): runs the checks in order as subprocesses (isolated: a CUDA error or an OOM of one
combination leaves the next one a clean process; the peak memory is that combination's), each with what is
left of the job's time budget. A multi-task job (one task per GPU) runs every check on every task, as the
array's jobs train with DDP (src.train exports the rendezvous from SLURM's variables); the tasks wait for each
other between checks (`barrier`) and rank 0 writes the results.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFLIGHT_STEPS = 2
PREFLIGHT_DIR = ".preflight"  # under the sweep dir; hidden dirs are not run records (analysis, run_sweep)
PROGRESS_FILE = "progress.json"
# what the preflight may change in a combination's composed config (tests/test_sweep_preflight.py checks it)
PREFLIGHT_KEYS = ("trainer.max_steps", "trainer.eval_every", "trainer.ckpt_every", "trainer.keep_last",
                  "eval.val.num_tokens", "eval.extrapolation.num_tokens", "eval.hellaswag.limit", "logger.mode")
HYDRA_HINT = "Set the environment variable HYDRA_FULL_ERROR=1"


def default_timeout_min(combinations: int) -> int:
    return 15 + 2 * combinations


# ------------------------------------------------------------------------------ what a check runs
def preflight_overrides(resolved: dict) -> list[str]:
    """The overrides that turn a combination's composed config (resolved, as a dict) into its preflight: a few
    steps, the final checkpoint only, every enabled evaluation once at the end on one full batch (the longest
    extrapolation window is the largest forward pass of the run), W&B offline. Nothing else changes."""
    evals, block = resolved["eval"], resolved["model"]["block_size"]
    overrides = [f"trainer.max_steps={PREFLIGHT_STEPS}", "trainer.eval_every=0", "trainer.ckpt_every=0",
                 "trainer.keep_last=1"]
    overrides.append(f"eval.val.num_tokens={min(evals['val']['num_tokens'], evals['val']['batch_size'] * block + 1)}")
    extra = evals["extrapolation"]
    if extra["enabled"] and extra["multipliers"]:
        longest = max(max(1, extra["batch_size"] // m) * m for m in extra["multipliers"]) * block + 1
        overrides.append(f"eval.extrapolation.num_tokens={min(extra['num_tokens'], longest)}")
    hellaswag = evals["hellaswag"]
    if hellaswag["enabled"]:
        items = min(hellaswag["limit"] or hellaswag["batch_size"], hellaswag["batch_size"])
        overrides.append(f"eval.hellaswag.limit={items}")
    if resolved["logger"]["name"] == "wandb" and resolved["logger"]["mode"] == "online":
        overrides.append("logger.mode=offline")
    return overrides


def is_run_placement(override: str) -> bool:
    """Hydra overrides that place or launch the real runs (the preflight places its own in hydra.run.dir)."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key.startswith(("hydra.launcher", "hydra/launcher", "hydra.sweep", "hydra.run", "hydra.sweeper",
                           "hydra/sweeper"))


@dataclass(frozen=True)
class Check:
    name: str  # the combination's run_name
    label: str  # its swept values
    overrides: tuple[str, ...]  # of `python -m src.train`: its real job's, with `changes` in place
    changes: tuple[str, ...] = ()  # the preflight's own overrides (PREFLIGHT_KEYS and the run dir)

    def command(self, python: str = "python") -> list[str]:
        return [python, "-m", "src.train", *self.overrides]


def checks_for(plan, preflight_dir: Path) -> list[Check]:
    """One check per combination still to run: its real job's overrides (the sweep's fixed task overrides, then
    its swept values), the preflight's replacing those of the same key."""
    from sweeps.run_sweep import merge_overrides

    fixed = [o for o in plan.fixed if not is_run_placement(o)]
    checks = []
    for combo in plan.todo:
        changes = [*preflight_overrides(combo.resolved), f"hydra.run.dir={preflight_dir / combo.run_dir.name}"]
        overrides = merge_overrides(fixed, [f"{k}={v}" for k, v in combo.values], changes)
        checks.append(Check(combo.run_dir.name, combo.label, tuple(overrides), tuple(changes)))
    return checks


# ------------------------------------------------------------------------------ the job
RUNNING: dict[str, subprocess.Popen | None] = {"proc": None}  # the check in progress


def stop_running_check(signum: int, _frame) -> None:
    """SIGTERM (scancel, the local job stopped by Ctrl-C or its time limit): the check in progress, in its own
    process group, goes too, then this runner."""
    proc = RUNNING["proc"]
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise SystemExit(128 + signum)


def run_checks(spec: dict) -> list[dict]:
    """In the preflight job: every check in turn, its result in progress.json as soon as it is known."""
    previous = signal.signal(signal.SIGTERM, stop_running_check)
    try:
        return _run_checks(spec)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_checks(spec: dict) -> list[dict]:
    pre_dir, log_dir = Path(spec["dir"]), Path(spec["log_dir"])
    checks = [Check(c["name"], c["label"], tuple(c["overrides"])) for c in spec["checks"]]
    deadline = time.monotonic() + spec["budget_s"]
    rank, ntasks = int(os.environ.get("SLURM_PROCID", 0)), int(os.environ.get("SLURM_NTASKS", 1))
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        rank, ntasks = 0, 1
    log_dir.mkdir(parents=True, exist_ok=True)
    progress = {"started": time.time(), "current": None, "results": [], "done": False,
                "host": os.uname().nodename, "job_id": os.environ.get("SLURM_JOB_ID")}
    for index, check in enumerate(checks):
        if time.monotonic() >= deadline:
            result = {"status": "not run", "error": f"the preflight's time budget ({spec['budget_s']:.0f} s) was "
                      "spent before it got here (--preflight-timeout MIN)", "seconds": 0.0}
        else:
            if rank == 0:
                progress["current"] = {"name": check.name, "started": time.time()}
                write_progress(pre_dir, progress)
            result = run_check(check, pre_dir, log_dir, deadline, rank)
        if ntasks > 1:  # every rank's process of this check has ended before any rank starts the next one
            barrier(pre_dir / ".sync", index, rank, ntasks, deadline + 120)
        if rank == 0:
            shutil.rmtree(pre_dir / check.name, ignore_errors=True)  # the throw-away run dir
            progress["results"].append({"name": check.name, "label": check.label, **result})
            progress["current"] = None
            write_progress(pre_dir, progress)
    if rank == 0:
        progress["done"] = True
        write_progress(pre_dir, progress)
    return progress["results"]


def run_check(check: Check, pre_dir: Path, log_dir: Path, deadline: float, rank: int) -> dict:
    """One combination's preflight run, as a subprocess with what is left of the budget. Its run dir starts
    empty: the submitter removed `.preflight/` before the job, run_checks removes each run dir after."""
    from src.metrics import PEAK_MEM

    run_dir = pre_dir / check.name
    log_path = log_dir / (f"{check.name}.log" if rank == 0 else f"{check.name}.rank{rank}.log")
    started = time.monotonic()
    timed_out = False
    with log_path.open("w") as log:
        # its own process group: a timeout stops the whole tree (compile workers, ...), not this runner
        proc = RUNNING["proc"] = subprocess.Popen(check.command(sys.executable), cwd=ROOT, stdout=log,
                                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            returncode = stop_process_group(proc)
        finally:
            RUNNING["proc"] = None
    seconds = time.monotonic() - started
    summary = read_json(run_dir / "summary.json")
    output = log_path.read_text(errors="replace")
    status, error = outcome(returncode, timed_out, seconds, summary, output)
    device = summary.get("device")
    peak = summary.get(PEAK_MEM) if str(device).startswith("cuda") else None  # on CPU it is the process's RSS
    return {"status": status, "error": error, "seconds": round(seconds, 1), "peak_mem_mb": peak, "device": device,
            "returncode": returncode, "log": str(log_path)}


def barrier(sync_dir: Path, index: int, rank: int, ntasks: int, until: float) -> None:
    """Wait until every task of the job is done with check `index` (a marker file per task, in the shared sweep
    dir), or until `until` (a task that hangs is killed at the deadline anyway). src.train's DDP rendezvous port
    is the job's (submitit's, from the job id), so no task may start check i + 1 while check i still runs."""
    sync_dir.mkdir(parents=True, exist_ok=True)
    (sync_dir / f"{index}.{rank}").touch()
    while len(list(sync_dir.glob(f"{index}.*"))) < ntasks and time.monotonic() < until:
        time.sleep(0.5)


def stop_process_group(proc: subprocess.Popen, grace_s: float = 30) -> int:
    """SIGTERM (the trainer checkpoints and stops), then SIGKILL, to the check's whole process group."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def outcome(returncode: int, timed_out: bool, seconds: float, summary: dict, output: str) -> tuple[str, str | None]:
    """ok, or failed with the first line of what went wrong: the run record's error, else the process's."""
    if timed_out:
        return "failed", (f"timed out after {seconds:.0f} s (step {summary.get('step', 0)} of {PREFLIGHT_STEPS}); "
                          f"the preflight's time budget is --preflight-timeout MIN")
    if returncode == 0 and summary.get("status") == "finished":
        return "ok", None
    if summary.get("status") == "failed" and summary.get("error"):
        return "failed", first_line(summary["error"])
    lines = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith(HYDRA_HINT)]
    said = [line for line in lines if line.startswith("error: ")]
    if said:  # src.train's one line for bad input and for a diverged run
        return "failed", first_line(said[-1].removeprefix("error: "))
    if returncode < 0:
        return "failed", f"killed by {signal.Signals(-returncode).name}" + (f" after: {lines[-1]}" if lines else "")
    if returncode == 0:
        return "failed", f"exit 0 but the run record says status {summary.get('status')} at step {summary.get('step')}"
    return "failed", first_line(lines[-1]) if lines else f"exit status {returncode}, no output"


def first_line(text: str, limit: int = 400) -> str:
    line = (str(text).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_progress(pre_dir: Path, progress: dict) -> None:
    tmp = pre_dir / f".{PROGRESS_FILE}.tmp"
    tmp.write_text(json.dumps(progress, indent=1))
    os.replace(tmp, pre_dir / PROGRESS_FILE)


def main(argv: list[str] | None = None) -> int:
    """`python -m sweeps.preflight SPEC.json`: the local preflight job."""
    (spec_path,) = argv if argv is not None else sys.argv[1:]
    results = run_checks(json.loads(Path(spec_path).read_text()))
    return 0 if all(r["status"] == "ok" for r in results) else 1


# ------------------------------------------------------------------------------ the submitter
class Preflight:
    """The preflight of `plan` (run_sweep's Plan): show what it runs, run it as one job, wait, judge."""

    def __init__(self, plan, jobs: int | None, timeout_min: float | None):
        from sweeps.run_sweep import SweepError

        self.plan, self.jobs = plan, jobs
        self.dir = plan.sweep_dir / PREFLIGHT_DIR
        self.log_dir = plan.sweep_dir / ".sweep_logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-preflight"
        self.checks = checks_for(plan, self.dir)
        self.timeout_min = timeout_min if timeout_min is not None else default_timeout_min(len(self.checks))
        if not self.timeout_min > 0:
            raise SweepError(f"--preflight-timeout {timeout_min}: give a positive number of minutes")
        if plan.launcher == "slurm":
            self.timeout_min = math.ceil(self.timeout_min)  # SLURM's --time is in whole minutes
        # the launcher settings of the array's jobs; --jobs runs plain processes, with no launcher settings
        self.params = launcher_params(plan.launcher, plan.fixed) if plan.launcher == "slurm" or jobs is None else {}
        self.signal_delay_s = float(self.params.get("signal_delay_s") or 0) if plan.launcher == "slurm" else 0.0
        timeout_s = 60 * self.timeout_min  # the job stops its last check before SLURM's USR2 and time limit
        self.budget_s = max(timeout_s / 2, timeout_s - self.signal_delay_s - 60)
        self.job_name = f"{plan.job_name}-preflight" if plan.job_name else None

    # -------------------------------------------------------------------------- what it runs
    def describe(self) -> str:
        where = "one SLURM job" if self.plan.launcher == "slurm" else "one local process"
        text = (f"preflight: {len(self.checks)} combination(s) x {PREFLIGHT_STEPS} steps, one after another in "
                f"{where}")
        if self.plan.launcher == "slurm":
            shown = {k: self.params[k] for k in SHOWN_SLURM if self.params.get(k) not in (None, {}, [])}
            text += f" ({self.job_name}: " + ", ".join(f"{k}={v}" for k, v in shown.items())
            text += f", time limit {self.timeout_min:g} min)"
        else:
            text += f" (time limit {self.timeout_min:g} min)"
        return text + f", run dirs in {self.dir}/ (removed after), logs in {self.log_dir}/"

    def show(self, commands: bool) -> None:
        """What the preflight runs; with `commands` (--dry-run) every combination's command line."""
        print(self.describe(), flush=True)
        changes = {shlex.join(c.changes[:-1]) for c in self.checks}  # without the run dir, its own per check
        print(f"  the runs' overrides, then: {' | '.join(sorted(changes))} hydra.run.dir={self.dir}/<run_name>",
              flush=True)
        for path in unprepared_datasets(self.plan):
            print(f"  data not prepared yet: {path} (the first check prepares it, inside the preflight's time "
                  f"limit; prepare a large dataset first, `python -m src.data.prepare data=...`, or raise "
                  f"--preflight-timeout)", flush=True)
        for check in self.checks if commands else ():
            print("  preflight $ " + shlex.join(check.command()), flush=True)

    def spec(self) -> dict:
        return {"dir": str(self.dir), "log_dir": str(self.log_dir), "budget_s": self.budget_s,
                "checks": [{"name": c.name, "label": c.label, "overrides": list(c.overrides)} for c in self.checks]}

    # -------------------------------------------------------------------------- run, wait, judge
    def run(self, interval: float) -> None:
        """Run the preflight; return if every check passed (its dir removed), else raise SweepError."""
        from sweeps.run_sweep import SweepError

        shutil.rmtree(self.dir, ignore_errors=True)  # an earlier preflight's leftovers
        self.dir.mkdir(parents=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        job = SlurmPreflightJob(self) if self.plan.launcher == "slurm" else LocalPreflightJob(self)
        started = time.monotonic()
        try:
            job.start()
            print(f"preflight: started {job.describe()}", flush=True)
            next_print = time.monotonic() + interval
            while not job.done():
                time.sleep(min(1.0, interval))
                if time.monotonic() >= next_print:
                    print(self.progress_line(job, started), flush=True)
                    next_print = time.monotonic() + interval
            results = self.results(job)
        finally:  # also on Ctrl-C or a refused submission: no job left running, no throw-away dir left
            job.stop_if_running()
            shutil.rmtree(self.dir, ignore_errors=True)
        failed = [r for r in results if r["status"] != "ok"]
        print(f"preflight: {len(results) - len(failed)} of {len(results)} combination(s) passed in "
              f"{time.monotonic() - started:.0f} s", flush=True)
        for r in results:
            print("  " + result_line(r), flush=True)
        if not failed:
            return
        named = "; ".join(f"{r['label']}: {r['error']}" for r in failed)
        raise SweepError(f"the preflight failed for {len(failed)} of {len(results)} combination(s) ({named}); "
                         f"nothing submitted. Logs: {self.log_dir}/")

    def read_progress(self) -> dict:
        return read_json(self.dir / PROGRESS_FILE)

    def progress_line(self, job, started: float) -> str:
        progress = self.read_progress()
        results = progress.get("results", [])
        ok = sum(r["status"] == "ok" for r in results)
        line = (f"[preflight {time.monotonic() - started:5.0f}s] {len(self.checks)} combinations: ok {ok} | failed "
                f"{len(results) - ok} | to check {len(self.checks) - len(results)}")
        current = progress.get("current")
        if current:
            line += f"; checking {current['name']} ({time.time() - current['started']:.0f} s)"
        state = job.state()
        return line + (f"  ({state})" if state else "")

    def results(self, job) -> list[dict]:
        """One result per check: the job's, or why it has none (the job ended before it got there)."""
        done = {r["name"]: r for r in self.read_progress().get("results", [])}
        why = job.why_ended() if len(done) < len(self.checks) else ""
        return [done.get(c.name) or {"name": c.name, "label": c.label, "status": "not run", "seconds": 0.0,
                                     "error": f"the preflight job ended before this combination finished: {why}"}
                for c in self.checks]


SHOWN_SLURM = ("partition", "account", "qos", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb",
               "constraint", "gres", "additional_parameters")


def result_line(r: dict) -> str:
    peak = f", peak {r['peak_mem_mb']:.0f} MiB" if r.get("peak_mem_mb") is not None else ""
    head = f"{'ok' if r['status'] == 'ok' else r['status'].upper():7s} {r['name']} ({r['label']}): {r['seconds']:.1f} s"
    return head + peak + (f": {r['error']}" if r["status"] != "ok" else "")


def unprepared_datasets(plan) -> list[Path]:
    """The dataset dirs of the combinations to run that prepare() has not finished (no meta.json), as the jobs
    see them (their working dir is ROOT)."""
    from src.data.config import DataConfig
    from src.data.prepare import dataset_dir
    from src.structured import to_dataclass

    found: list[Path] = []
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        for combo in plan.todo:
            try:
                path = dataset_dir(to_dataclass(DataConfig, combo.resolved["data"])).absolute()
            except Exception:  # noqa: BLE001  (a source that cannot say: the check will)
                continue
            if path not in found and not (path / "meta.json").is_file():
                found.append(path)
    finally:
        os.chdir(cwd)
    return found


def launcher_params(launcher: str, fixed: list[str]) -> dict:
    """The resolved hydra.launcher node of conf/hydra/launcher/<launcher>.yaml under `fixed` (what the array's
    jobs get), without submitit_folder (a Hydra sweep dir)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    import src.schemas  # noqa: F401
    from sweeps.run_sweep import SweepError, one_line

    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            cfg = compose(config_name="train", overrides=[f"hydra/launcher={launcher}", *fixed],
                          return_hydra_config=True)
            node = cfg.hydra.launcher
            return {str(k): OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                    for k in node if k not in ("_target_", "submitit_folder")
                    for v in [OmegaConf.select(node, str(k))]}
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise SweepError(f"cannot compose the {launcher} launcher settings for the preflight: "
                         f"{one_line(err)}") from None


def slurm_executor_params(params: dict, job_name: str, timeout_min: float) -> dict:
    """submitit's update_parameters for the preflight job: the array's launcher settings mapped as
    hydra-submitit-launcher maps them (its BaseQueueConf keys as they are, the others `slurm_`-prefixed), with
    the preflight's job name and time limit; no requeue (max_num_timeout: the executor's, 0), no array."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {**{k: v for k, v in params.items() if k not in ("max_num_timeout", "array_parallelism")},
              "name": job_name, "timeout_min": math.ceil(timeout_min)}
    return {k if k in base else f"slurm_{k}": v for k, v in params.items()}


class SlurmPreflightJob:
    """The preflight as one submitit job, parameters mapped as hydra-submitit-launcher maps the array's."""

    def __init__(self, preflight: Preflight):
        self.preflight, self.job = preflight, None

    def start(self) -> None:
        import submitit

        from sweeps.run_sweep import SweepError

        pre = self.preflight
        executor = submitit.AutoExecutor(folder=pre.log_dir / "submitit", cluster="slurm", slurm_max_num_timeout=0)
        executor.update_parameters(**slurm_executor_params(pre.params, pre.job_name, pre.timeout_min))
        cwd = os.getcwd()
        try:
            os.chdir(ROOT)  # the job's working dir, as the array's (run_sweep starts its multiruns in ROOT)
            self.job = executor.submit(run_checks, pre.spec())
        except Exception as err:  # submitit's FailedSubmissionError carries sbatch's message
            raise SweepError(f"the preflight job could not be submitted ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:400]}); nothing submitted") from None
        finally:
            os.chdir(cwd)

    def describe(self) -> str:
        return f"SLURM job {self.job.job_id} ({self.preflight.job_name})"

    def done(self) -> bool:
        return self.job.done()

    def state(self) -> str:
        from sweeps.run_sweep import slurm_states

        states = slurm_states(self.preflight.job_name)
        return "squeue: " + (", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "empty")

    def stop_if_running(self) -> None:
        if self.job is not None and not self.job.done():
            self.job.cancel(check=False)
            print(f"preflight: cancelled SLURM job {self.job.job_id}", flush=True)

    def why_ended(self) -> str:
        state = self.job.get_info(mode="force").get("State", "UNKNOWN").split()[0]
        error = self.job.exception()
        return f"SLURM state {state}" + (f", {first_line(' '.join(str(error).split()), 300)}" if error else "")


class LocalPreflightJob:
    """The preflight as one local process (`python -m sweeps.preflight`), no SLURM."""

    def __init__(self, preflight: Preflight):
        self.preflight, self.proc = preflight, None
        self.log_path = preflight.log_dir / "preflight.log"

    def start(self) -> None:
        pre = self.preflight
        spec_path = pre.dir / "spec.json"
        spec_path.write_text(json.dumps(pre.spec(), indent=1))
        env = dict(os.environ)
        if pre.jobs is None:  # the runs go through submitit_local, which shows them only the GPUs they ask for
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(pre.params.get("gpus_per_node") or 0))
        self.deadline = time.monotonic() + 60 * pre.timeout_min
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "sweeps.preflight", str(spec_path)], cwd=ROOT,
                                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def describe(self) -> str:
        return f"local process {self.proc.pid}, log {self.log_path}"

    def done(self) -> bool:
        if self.proc.poll() is None and time.monotonic() > self.deadline:
            stop_process_group(self.proc, grace_s=10)
        return self.proc.poll() is not None

    def state(self) -> str:
        return ""

    def stop_if_running(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process_group(self.proc, grace_s=10)
            print(f"preflight: stopped local process {self.proc.pid}", flush=True)

    def why_ended(self) -> str:
        lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        return f"exit status {self.proc.returncode}" + (f", last line: {first_line(lines[-1], 300)}" if lines else "")


if __name__ == "__main__":
    sys.exit(main())
