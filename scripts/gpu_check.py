"""`make gpu-check`: the first command to run on a machine with one CUDA GPU; at most 9 minutes.

    python scripts/gpu_check.py                         # all three parts, report in outputs/gpu-check/report.md
    python scripts/gpu_check.py --parts tests,grid      # a subset (tests | bench | grid)
    python scripts/gpu_check.py --plan                  # print the estimate and the budgets, run nothing

Three parts, in this order, each under its budget (a part that finishes early leaves its time to the next;
one that runs past its deadline is stopped and reported as failed; the script goes on either way):
  (i)   tests: `pytest -m cuda` (tests/test_cuda.py and every other test marked cuda), in 4 concurrent shards;
  (ii)  bench: `make bench-gpu` (the GPU performance targets, docs/PERFORMANCE.md);
  (iii) grid:  20 training steps of every PE x attention at the sizes of conf/experiment/gpt2_124m_fineweb.yaml
        (12 layers, 768 wide, T=1024, trainer.micro_batch_size=auto, bf16), on the embedded corpus with the GPT-2
        tokenizer (no download), compile off, 8 sequences (8192 tokens) per step, validation loss only.
Before starting it prints the estimate of each part (derived below) next to its budget; at the end it writes one
Markdown report: pass/fail per part, the test failures, bench-gpu's targets table, and per combination the
tokens/s, MFU, peak memory, the micro-batch that `auto` chose and the attention backend (from each run's
summary.json). Exit status: 0 all parts passed, 1 any part failed, 2 no CUDA GPU (nothing run).

The grid runs in one worker process that trains the combinations one after the other through `train()` (a new
process per combination would add ~5 s of imports and CUDA start-up each); a combination that kills the worker,
leaves CUDA unusable ("CUDA error"), or whose FlexAttention call failed (the fallback would put every later one on
the dense path) ends it, and the next worker goes on with the rest.

Not yet run on a GPU: the estimate's constants (`Assumptions`) are assumptions, the report shows the measured
time of each part next to its estimate so that the first run calibrates them.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BUDGET_S = 540  # 9 minutes, all parts together (8 PEs x 3 attentions; 8 minutes held 7 x 3)
RECIPE = "gpt2_124m_fineweb"  # conf/experiment/: the sizes (and optimiser settings) of the grid part
CONTEXT = 1024  # the recipe's block_size (model=gpt2); tests/test_gpu_check.py checks it against the composed config
STEPS = 20
SEQUENCES_PER_STEP = 8  # trainer.total_batch_tokens = 8 x 1024; auto picks the largest power of two <= 8 that fits
VAL_TOKENS = 8 * CONTEXT  # one batch of validation windows: the final evaluation is there, not measured
DEFAULT_OUT = ROOT / "outputs" / "gpu-check"
PART_KEYS = ("tests", "bench", "grid")
TITLES = {"tests": "(i) CUDA tests: pytest -m cuda", "bench": "(ii) make bench-gpu",
          "grid": f"(iii) {STEPS} steps of every PE x attention at 124M"}
BUDGETS = {"tests": 150, "bench": 250, "grid": 140}  # seconds; sum = BUDGET_S
# pytest -k expressions: shards (i) runs concurrently (correctness only, nothing is timed); the last one is the
# complement of the others, so together they run exactly what `pytest -m cuda` runs.
SHARDS = ("(one_trainer_step and eager) or kv_cache or hellaswag_on_cuda", "flex_matches_dense", "resume_on_cuda")
SHARDS = (*SHARDS, " and ".join(f"not ({expr})" for expr in SHARDS))
STOP_GRACE_S = 5  # SIGINT first (pytest writes its junit file, the trainer its checkpoint), SIGKILL after this


@dataclass(frozen=True)
class Assumptions:
    """What the estimate assumes. Guesses for one H100/H200 with a cold compile cache, not measurements: the report
    puts each part's measured time next to its estimate; correct these from it."""
    process_s: float = 6.0  # a python process: import torch (CUDA libraries), hydra, src; CUDA context
    pytest_start_s: float = 12.0  # + collecting every test module
    mfu_eager: float = 0.20  # model FLOPs / peak of an eager bf16 step (124M, T=1024, 8 sequences)
    mfu_compiled: float = 0.40  # compiled (bench-gpu)
    compile_124m_s: float = 18.0  # torch.compile of one 12-layer model, forward + backward
    compile_cold_extra_s: float = 12.0  # the first compile of a process: no kernel in the cache yet
    flex_program_s: float = 6.0  # a new FlexAttention program (score_mod x mask_mod x dtype): Triton fwd + bwd;
    # also the cost of FlexAttention's probe (flex_available), once per process and dtype that trains with it
    compile_tiny_s: float = 10.0  # torch.compile of the 2-layer test model
    tiny_run_s: float = 0.8  # one train() of the test model on CUDA: setup, a few steps, evaluation, checkpoint
    tiny_case_s: float = 0.3  # a forward/backward comparison or a decoding/scoring test of the test model
    other_cuda_tests_s: float = 25.0  # cuda tests outside test_cuda.py (test_model's compiled Linformer flex path)
    profile_s: float = 2.0  # bench --profile: 2 profiled steps, the table and the Chrome trace, per model
    build_124m_s: float = 0.7  # build + init on CPU, move to the GPU, AdamW
    checkpoint_124m_s: float = 0.8  # the final checkpoint: 0.5 GB of weights + 1 GB of AdamW state
    eval_124m_s: float = 0.2  # one batch of validation windows


# ---------------------------------------------------------------------------------------------- the grid
def combos() -> list[tuple[str, str]]:
    from src.model import ATTENTION_REGISTRY, PE_REGISTRY

    return [(pe, attention) for pe in PE_REGISTRY.names() for attention in ATTENTION_REGISTRY.names()]


def combo_name(pe: str, attention: str) -> str:
    return f"{pe}-{attention}"


def uses_flex(pe: str, attention: str) -> bool:
    """Does a CUDA training step of pe+attention run FlexAttention: a mechanism with `use_flex` does for a bias PE,
    and Linformer for every PE (its visibility rule); flash without a bias is SDPA (docs/ARCHITECTURE.md)."""
    import dataclasses

    from src.model import ATTENTION_REGISTRY, PE_REGISTRY

    has_flex = "use_flex" in {f.name for f in dataclasses.fields(ATTENTION_REGISTRY.entry(attention)[0])}
    return has_flex and (PE_REGISTRY.entry(pe)[1].has_bias or attention != "flash")


def flex_programs(pairs: list[tuple[str, str]]) -> int:
    """Distinct FlexAttention programs (compiles) among `pairs`: one per attention x bias PE (its score_mod); the PEs
    without a bias share one per attention (no score_mod)."""
    from src.model import PE_REGISTRY

    return len({(attention, pe if PE_REGISTRY.entry(pe)[1].has_bias else None)
                for pe, attention in pairs if uses_flex(pe, attention)})


def component_overrides(pe: str, attention: str, block_size: int) -> list[str]:
    """Each component's `for_context` settings as Hydra overrides (as the benchmark and the tests size them)."""
    from src.model import ATTENTION_REGISTRY, PE_REGISTRY

    def value(v) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)

    nodes = {"pe": PE_REGISTRY.for_context(pe, block_size), "attention": ATTENTION_REGISTRY.for_context(attention,
                                                                                                       block_size)}
    return [f"model.{group}.{k}={value(v)}" for group, node in nodes.items() for k, v in node.items() if k != "name"]


# The 124M recipe, shortened to STEPS steps of SEQUENCES_PER_STEP sequences on local data (the embedded corpus
# with the GPT-2 tokenizer instead of FineWeb-Edu; no W&B; validation loss only instead of the full suite).
SHARED_OVERRIDES = [
    f"experiment={RECIPE}", "data=embedded", "data.tokenizer=gpt2", "logger=none", "eval=val_only",
    f"eval.val.num_tokens={VAL_TOKENS}", f"trainer.max_steps={STEPS}",
    f"trainer.total_batch_tokens={SEQUENCES_PER_STEP * CONTEXT}", "trainer.micro_batch_size=auto",
    "trainer.compile=false", "trainer.dtype=bfloat16", "trainer.device=cuda", "trainer.warmup_steps=5",
    "trainer.log_every=5", "trainer.eval_every=0", "trainer.ckpt_every=0", "trainer.keep_last=1",
    "trainer.resume=never", "trainer.progress=false",
]


def grid_overrides(pe: str, attention: str) -> list[str]:
    return [*SHARED_OVERRIDES, f"model/pe={pe}", f"model/attention={attention}",
            *component_overrides(pe, attention, CONTEXT), f"run_name={combo_name(pe, attention)}"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import src.schemas  # noqa: F401  (the schemas and resolvers conf/ needs)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return hydra_compose(config_name="train", overrides=overrides)


# ---------------------------------------------------------------------------------------------- the estimate
@functools.cache
def flops_per_token(context: int, n_layer: int = 12, n_head: int = 12, n_embd: int = 768,
                    vocab_size: int = 50304) -> float:
    """src/training/flops.py's 6N + 12·L·T·C for GPT-2 at these sizes (the model built on the meta device)."""
    import torch

    from src.model import build_model
    from src.training import flops

    with torch.device("meta"):
        model = build_model(dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=context,
                                 vocab_size=vocab_size))
    return flops.flops_per_token(model, context)


def step_seconds(tokens: int, context: int, peak: float, mfu: float, **sizes) -> float:
    return tokens * flops_per_token(context, **sizes) / (peak * mfu)


def bench_commands() -> list[list[str]]:
    """The `python -m src.benchmark` argument lists of `make bench-gpu` (from `make -n`: the Makefile decides)."""
    dry = subprocess.run(["make", "-n", "bench-gpu"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    commands = []
    for line in dry.replace("\\\n", " ").splitlines():
        if "src.benchmark" not in line or line.lstrip().startswith("#"):
            continue
        words = shlex.split(line)
        if "-m" in words and words[words.index("-m") + 1:][:1] == ["src.benchmark"]:
            commands.append(words[words.index("-m") + 2:])
    return commands


def estimate_bench_run(argv: list[str], peak: float, a: Assumptions) -> float:
    """One `python -m src.benchmark` run: per cell, every model compiled (if compile is on), each FlexAttention
    program, the steps (warm-up, timed rounds, the memory step, the profiled ones; the peer steps next to every
    combination) at mfu_compiled / mfu_eager, and the profiles."""
    from src.benchmark.grid import parse_args

    args = parse_args(argv)
    sizes = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, vocab_size=args.vocab_size)
    pairs = [(pe, attention) for pe in args.pes for attention in args.attentions]
    extra = 1 + (2 if args.profile else 0)  # the memory step, the profiled steps
    total, cold = a.process_s, a.compile_cold_extra_s
    for compile in {"on": [True], "off": [False], "both": [False, True]}[args.compile]:
        for context in args.context:
            for batch in args.batch:
                models = len(pairs) + 1  # + the peer
                if compile:
                    total += models * a.compile_124m_s + cold
                    cold = 0.0
                total += flex_programs(pairs) * a.flex_program_s
                ours = args.warmup + args.repeats * args.steps + extra
                peer = args.warmup + len(pairs) * args.repeats * args.steps + extra
                mfu = a.mfu_compiled if compile else a.mfu_eager
                total += (len(pairs) * ours + peer) * step_seconds(batch * context, context, peak, mfu, **sizes)
                total += models * a.profile_s if args.profile else 0.0
    return total


def estimate_bench(peak: float, a: Assumptions) -> tuple[float, str]:
    commands = bench_commands()
    total = sum(estimate_bench_run(argv, peak, a) for argv in commands) + a.process_s  # + the targets check
    shown = [[w for i, w in enumerate(argv) if "--out" not in argv[max(0, i - 1):i + 1]] for argv in commands]
    cells = "; ".join(shlex.join(argv) for argv in shown)
    return total, f"{len(commands)} benchmark runs (`make -n bench-gpu`): {cells}"


def estimate_tests(a: Assumptions) -> tuple[float, str]:
    """The shards run concurrently: the longest one, plus pytest's start. Flex programs compile per shard (process),
    and each shard probes FlexAttention once per dtype it trains with (bf16; (b) also fp32)."""
    from tests.test_cuda import COMPILED_STEP_COMBOS

    pairs = combos()
    n, programs = len(pairs), flex_programs(pairs)
    flex_cases = sum(uses_flex(pe, attention) for pe, attention in pairs) * 2  # fp32 and bf16
    compiled_flex = sum(uses_flex(pe, attention) for pe, attention in COMPILED_STEP_COMBOS)
    shards = [
        n * a.tiny_run_s + (programs + 1) * a.flex_program_s + 2 * n * a.tiny_case_s,  # (a) eager, (c), (d)
        2 * (programs + 1) * a.flex_program_s + flex_cases * a.tiny_case_s,  # (b): a program per dtype
        3 * n * a.tiny_run_s + (programs + 1) * a.flex_program_s,  # (e): 3 runs each
        len(COMPILED_STEP_COMBOS) * (a.compile_tiny_s + a.tiny_run_s) + (compiled_flex + 1) * a.flex_program_s
        + a.other_cuda_tests_s,  # (a) compiled, DDP (skipped on one GPU), the other files' cuda tests
    ]
    detail = (f"{n} combinations, {programs} FlexAttention programs per dtype, compiled step for "
              f"{len(COMPILED_STEP_COMBOS)}; shards ≈ " + " / ".join(f"{s:.0f}" for s in shards) + " s")
    return a.pytest_start_s + max(shards), detail


def estimate_grid(peak: float, a: Assumptions) -> tuple[float, str]:
    pairs = combos()
    step = step_seconds(SEQUENCES_PER_STEP * CONTEXT, CONTEXT, peak, a.mfu_eager)
    # + 1 step: micro_batch_size=auto tries the first step's passes at the largest size before the step itself
    per_combo = a.build_124m_s + (STEPS + 1) * step + a.eval_124m_s + a.checkpoint_124m_s
    programs = flex_programs(pairs) + 1  # + FlexAttention's probe (bf16), once in the worker
    total = a.process_s + len(pairs) * per_combo + programs * a.flex_program_s
    detail = (f"{len(pairs)} combinations x ({STEPS}+1 steps x {step * 1e3:.0f} ms + build, evaluation, checkpoint "
              f"≈ {per_combo:.1f} s) + {programs} FlexAttention compiles (the probe included); "
              f"{flops_per_token(CONTEXT) / 1e6:.0f} MFLOP/token (6N + 12·L·T·C)")
    return total, detail


@dataclass
class Part:
    key: str
    estimate_s: float
    budget_s: float
    detail: str

    @property
    def title(self) -> str:
        return TITLES[self.key]


def plan(peak: float, a: Assumptions = Assumptions(), keys: tuple[str, ...] = PART_KEYS) -> list[Part]:
    """The parts to run (in PART_KEYS order), each with its estimate for a GPU of bf16 peak `peak` and its budget."""
    estimators = {"tests": lambda: estimate_tests(a), "bench": lambda: estimate_bench(peak, a),
                  "grid": lambda: estimate_grid(peak, a)}
    parts = []
    for key in (k for k in PART_KEYS if k in keys):
        seconds, detail = estimators[key]()
        parts.append(Part(key, round(seconds, 1), BUDGETS[key], detail))
    return parts


def plan_table(parts: list[Part], device: str, peak: float, peak_known: bool) -> str:
    lines = [f"gpu-check on {device}: bf16 peak {peak / 1e12:.0f} TFLOP/s"
             + ("" if peak_known else " (not in src/training/flops.py: H100's assumed)")
             + f", budget {sum(p.budget_s for p in parts):.0f} s",
             f"  {'part':<48} {'estimate':>9} {'budget':>8}"]
    for part in parts:
        over = "  <- over its budget" if part.estimate_s > part.budget_s else ""
        lines.append(f"  {part.title:<48} {part.estimate_s:>7.0f} s {part.budget_s:>6.0f} s{over}")
        lines.append(f"      {part.detail}")
    total = sum(p.estimate_s for p in parts)
    lines.append(f"  {'total':<48} {total:>7.0f} s {sum(p.budget_s for p in parts):>6.0f} s")
    lines.append(f"  assumptions: {', '.join(f'{k}={v}' for k, v in asdict(Assumptions()).items())}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- running parts
@dataclass
class Result:
    key: str
    ok: bool
    seconds: float
    estimate_s: float
    budget_s: float
    summary: str  # one line for the parts table
    details: list[str] = field(default_factory=list)  # Markdown lines of the part's section

    @property
    def title(self) -> str:
        return TITLES[self.key]


def stop(proc: subprocess.Popen) -> None:
    """SIGINT to the process group this script started (start_new_session), then SIGKILL after STOP_GRACE_S."""
    for sig, wait in ((signal.SIGINT, STOP_GRACE_S), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


def run_until(commands: list[tuple[list[str], Path]], deadline: float, env: dict | None = None) -> list[int | None]:
    """Run the commands concurrently (output to their log files) until they end or the deadline passes; the return
    codes, None for a command stopped at the deadline."""
    procs = []
    for argv, log in commands:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            procs.append(subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                          start_new_session=True))
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.5)
    codes = []
    for p in procs:
        if p.poll() is None:
            stop(p)
            codes.append(None)
        else:
            codes.append(p.returncode)
    return codes


def junit_counts(path: Path) -> dict:
    """passed/failed/errors/skipped, the failures (node id: first line) and the skip reasons of a junit file."""
    counts = dict(passed=0, failed=0, errors=0, skipped=0, failures=[], skip_reasons=Counter())
    if not path.is_file():
        return counts
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            child = kinds.get("failure", kinds.get("error"))
            counts["failed" if "failure" in kinds else "errors"] += 1
            message = (child.get("message") or child.text or "").strip().splitlines()
            counts["failures"].append(f"{name}: {message[0][:300] if message else '?'}")
        elif "skipped" in kinds:
            counts["skipped"] += 1
            counts["skip_reasons"][(kinds["skipped"].get("message") or "").strip()[:200]] += 1
        else:
            counts["passed"] += 1
    return counts


def run_tests(out: Path, deadline: float, part: Part) -> Result:
    start = time.monotonic()
    shard_dir = out / "tests"
    commands = [([sys.executable, "-m", "pytest", "tests", "-m", "cuda", "-k", expr, "-q", "-rfEs",
                  "-p", "no:cacheprovider", f"--junitxml={shard_dir / f'shard{i}.xml'}"], shard_dir / f"shard{i}.log")
                for i, expr in enumerate(SHARDS)]
    threads = str(max(1, (os.cpu_count() or 4) // len(SHARDS)))  # Inductor's compile workers, shared out
    codes = run_until(commands, deadline, env={"TORCHINDUCTOR_COMPILE_THREADS": threads})
    totals = dict(passed=0, failed=0, errors=0, skipped=0)
    failures, reasons, problems = [], Counter(), []
    for i, code in enumerate(codes):
        counts = junit_counts(shard_dir / f"shard{i}.xml")
        for key in totals:
            totals[key] += counts[key]
        failures += counts["failures"]
        reasons.update(counts["skip_reasons"])
        if code is None:
            problems.append(f"shard {i} stopped at the deadline (tests/shard{i}.log)")
        elif code not in (0, 1, 5):  # 1: tests failed (counted above), 5: the shard selected nothing
            problems.append(f"shard {i} exited {code} (tests/shard{i}.log)")
        elif code == 1 and not (counts["failed"] or counts["errors"]):
            problems.append(f"shard {i} exited 1 with no failure in its junit file (tests/shard{i}.log)")
    ran = sum(totals.values())
    ok = not problems and not totals["failed"] and not totals["errors"] and ran > 0
    summary = (f"{totals['passed']} passed, {totals['failed']} failed, {totals['errors']} errors, "
               f"{totals['skipped']} skipped" + ("; " + "; ".join(problems) if problems else ""))
    details = [f"`pytest tests -m cuda` in {len(SHARDS)} concurrent shards (`-k`): "
               + ", ".join(f"`{expr}`" for expr in SHARDS) + ". Logs and junit files: `tests/`.", ""]
    details += ["Failures:", ""] + [f"- {line}" for line in failures] + [""] if failures else []
    if reasons:
        details += ["Skipped (count: reason):", ""] + [f"- {n}: {reason}" for reason, n in reasons.most_common()]
    return Result("tests", ok, time.monotonic() - start, part.estimate_s, part.budget_s, summary, details)


def run_bench(out: Path, deadline: float, part: Part) -> Result:
    start = time.monotonic()
    bench_dir = out / "bench-gpu"
    [code] = run_until([(["make", "bench-gpu", f"BENCH_GPU_OUT={bench_dir}", f"PYTHON={sys.executable}"],
                         out / "bench-gpu.log")], deadline)
    targets = bench_dir / "targets.md"
    table = targets.read_text().splitlines() if targets.is_file() else []
    statuses = Counter(line.rstrip(" |").rsplit("|", 1)[-1].strip() for line in table[2:])
    errors = []
    for bench_json in sorted(bench_dir.glob("*/bench.json")):
        for row in json.loads(bench_json.read_text())["results"]:
            if row.get("error"):
                errors.append(f"{bench_json.parent.name}: {row['pe']}+{row['attention']} ({row['model']}): "
                              f"{row['error'][:300]}")
    ok = code == 0 and bool(table)
    what = "stopped at the deadline" if code is None else f"exit {code}"
    summary = (", ".join(f"{n} {status}" for status, n in sorted(statuses.items())) or "no targets.md") + f" ({what})"
    details = ["`make bench-gpu` (bench-gpu.log, bench-gpu/): the targets of docs/PERFORMANCE.md.", ""] + table
    if errors:
        details += ["", "Benchmark rows with an error:", ""] + [f"- {line}" for line in errors]
    return Result("bench", ok, time.monotonic() - start, part.estimate_s, part.budget_s, summary, details)


def status_path(grid_dir: Path, name: str) -> Path:
    return grid_dir / "_status" / f"{name}.json"


def read_status(grid_dir: Path, name: str) -> dict:
    path = status_path(grid_dir, name)
    return json.loads(path.read_text()) if path.is_file() else {}


def write_status(grid_dir: Path, name: str, **fields) -> None:
    path = status_path(grid_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fields))


def run_grid(out: Path, deadline: float, part: Part) -> Result:
    """The worker trains the combinations in order; it is restarted after the one that ended it."""
    start = time.monotonic()
    grid_dir = out / "grid"
    todo, worker, why_not = [combo_name(pe, attention) for pe, attention in combos()], 0, "out of budget"
    while todo and time.monotonic() < deadline:
        log = f"grid-worker{worker}.log"
        argv = [sys.executable, str(Path(__file__).resolve()), "--grid-worker", "--out", str(out),
                "--combos", ",".join(todo)]
        [code] = run_until([(argv, out / log)], deadline)
        for name in todo:
            if read_status(grid_dir, name).get("state") == "running":  # the one the worker was on when it ended
                why = "stopped at the deadline" if code is None else f"ended the worker (exit {code})"
                write_status(grid_dir, name, state="done", ok=False, seconds=None, error=f"{why}: see {log}")
        left = [name for name in todo if read_status(grid_dir, name).get("state") != "done"]
        worker += 1
        if code is None or code == 130 or left == todo:  # the deadline, a stop, or a worker that trained nothing
            why_not = "out of budget" if code in (None, 130) else f"the worker failed before training (see {log})"
            todo = left
            break
        todo = left
    for name in todo:
        write_status(grid_dir, name, state="not run", ok=False, seconds=None, error=f"not run: {why_not}")
    rows = grid_rows(grid_dir, combos())
    passed = sum(row["ok"] for row in rows)
    summary = f"{passed}/{len(rows)} combinations trained {STEPS} steps"
    summary += f" ({worker} workers)" if worker > 1 else ""
    details = [f"`train()` with `{' '.join(SHARED_OVERRIDES)} model/pe=<pe> model/attention=<attention>` and each "
               "component's `for_context` settings (run dirs under `grid/`, checkpoints deleted after each run; worker "
               "logs `grid-worker*.log`). tokens/s and MFU: the trainer's median over its 4 logged windows of 5 steps "
               "(compilation happens before, in the auto micro-batch search's passes).", "", *grid_table(rows)]
    return Result("grid", passed == len(rows), time.monotonic() - start, part.estimate_s, part.budget_s, summary,
                  details)


def grid_worker(out: Path, names: list[str]) -> int:
    """Train each combination in this process. Exit 3 after a CUDA error (the context may be unusable), 4 after a
    combination whose FlexAttention call failed (the fallback would put every later one on the dense path), 130
    when stopped: run_grid starts a fresh worker for the rest."""
    import torch
    import torch._dynamo

    from src.metrics import TRAIN_LOSS
    from src.model.attention import flex_available
    from src.training.trainer import train

    # Every combination's FlexAttention program is a recompile of the same frame: past dynamo's limit (8) it would
    # silently drop to eager FlexAttention, which is neither what training runs nor fast.
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    flex_ok, flex_why = flex_available(cuda, bf16)  # the probe, once: False here means no combination can have it
    grid_dir = out / "grid"
    by_name = {combo_name(pe, attention): (pe, attention) for pe, attention in combos()}
    for name in names:
        pe, attention = by_name[name]
        run_dir = grid_dir / name
        write_status(grid_dir, name, state="running")
        torch.cuda.reset_peak_memory_stats()
        start, error, cuda_error, stopped = time.monotonic(), None, False, False
        try:
            summary = train(compose(grid_overrides(pe, attention)), run_dir)
            loss, stopped = summary.get(TRAIN_LOSS), summary.get("status") == "interrupted"
            backend = summary.get("attention_backend")
            if summary.get("status") != "finished":
                error = summary.get("error") or f"status {summary.get('status')}"
            elif not (isinstance(loss, float) and math.isfinite(loss)):
                error = f"final train/loss {loss}"
            elif uses_flex(pe, attention) and backend != "flex":
                error = f"attention backend {backend}, not flex: {flex_available(cuda, bf16)[1] or flex_why}"
        except Exception as err:  # a failing combination is reported, the others still run
            error = " ".join(f"{type(err).__name__}: {err}".split())[:500]
            cuda_error = "CUDA error" in error
        finally:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # 21 x 1.5 GB would fill the disk
            gc.collect()
            torch.cuda.empty_cache()
        write_status(grid_dir, name, state="done", ok=error is None, error=error,
                     seconds=round(time.monotonic() - start, 1))
        print(f"{name}: {'ok' if error is None else error} ({time.monotonic() - start:.1f} s)", flush=True)
        if stopped:  # SIGINT from run_until at the deadline: the trainer checkpointed and returned
            return 130
        if cuda_error:
            return 3
        if flex_ok and not flex_available(cuda, bf16)[0]:  # this combination's flex call failed and fell back
            return 4
    return 0


def grid_rows(grid_dir: Path, pairs: list[tuple[str, str]]) -> list[dict]:
    """One row per combination from its status file, summary.json and metrics.jsonl (missing values: None)."""
    from src.metrics import MFU, PEAK_MEM, STEP, TOKENS_PER_S, TRAIN_LOSS
    from src.run_record import RunRecord

    rows = []
    for pe, attention in pairs:
        name = combo_name(pe, attention)
        status, record = read_status(grid_dir, name), RunRecord(grid_dir / name)
        summary = record.read_summary()
        losses = [(r[STEP], r[TRAIN_LOSS]) for r in record.read_metrics() if TRAIN_LOSS in r]
        rows.append(dict(
            pe=pe, attention=attention, ok=bool(status.get("ok")), error=status.get("error"),
            seconds=status.get("seconds"), step=summary.get(STEP),
            micro_batch_size=summary.get("micro_batch_size"), grad_accum=summary.get("grad_accum"),
            attention_backend=summary.get("attention_backend"), tokens_per_s=summary.get(TOKENS_PER_S),
            mfu=summary.get(MFU), peak_mem_mb=summary.get(PEAK_MEM),
            first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
        ))
    return rows


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def grid_table(rows: list[dict]) -> list[str]:
    lines = ["| PE | attention | status | micro-batch | grad accum | attention backend | tokens/s | MFU | peak GiB | "
             "train/loss (step) | time s | error |",
             "|---|---|---|---:|---:|---|---:|---:|---:|---|---:|---|"]
    for r in rows:
        loss = ("–" if r["first_loss"] is None else
                f"{r['first_loss'][1]:.3f} ({r['first_loss'][0]}) → {r['last_loss'][1]:.3f} ({r['last_loss'][0]})")
        peak = None if r["peak_mem_mb"] is None else r["peak_mem_mb"] / 1024
        error = (r["error"] or "").replace("|", "\\|")
        lines.append(f"| {r['pe']} | {r['attention']} | {'PASS' if r['ok'] else 'FAIL'} | "
                     f"{_fmt(r['micro_batch_size'], '')} | {_fmt(r['grad_accum'], '')} | "
                     f"{_fmt(r['attention_backend'], '')} | {_fmt(r['tokens_per_s'], ',.0f')} | "
                     f"{_fmt(r['mfu'], '.1%')} | "
                     f"{_fmt(peak, '.1f')} | {loss} | {_fmt(r['seconds'], '.1f')} | {error} |")
    return lines


# ---------------------------------------------------------------------------------------------- the report
def report_markdown(results: list[Result], meta: dict) -> str:
    ok = all(r.ok for r in results)
    total = sum(r.seconds for r in results)
    lines = [f"# GPU check: {'PASS' if ok else 'FAIL'}", "",
             f"{meta.get('device', '?')}, torch {meta.get('torch', '?')} (CUDA {meta.get('cuda', '?')}), commit "
             f"{meta.get('commit', '?')}, {meta.get('date', '?')}; {total:.0f} s of the {BUDGET_S} s budget.", "",
             "| part | status | time s | estimate s | budget s | result |", "|---|---|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r.title} | {'PASS' if r.ok else 'FAIL'} | {r.seconds:.0f} | {r.estimate_s:.0f} | "
                     f"{r.budget_s:.0f} | {r.summary} |")
    for r in results:
        lines += ["", f"## {r.title}", "", *r.details]
    lines += ["", "## Estimate assumptions", "", "Correct `Assumptions` in scripts/gpu_check.py from the times above.",
              "", "| assumption | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in asdict(Assumptions()).items()]
    return "\n".join(lines) + "\n"


def exit_status(results: list[Result]) -> int:
    return 0 if results and all(r.ok for r in results) else 1


def clear_outputs(out: Path, keys: tuple[str, ...] = PART_KEYS) -> None:
    """Remove what an earlier gpu-check wrote for these parts (only its own files and folders), and the report."""
    folders = {"tests": ["tests"], "bench": ["bench-gpu"], "grid": ["grid"]}
    files = {"tests": [], "bench": [out / "bench-gpu.log"], "grid": list(out.glob("grid-worker*.log"))}
    for key in keys:
        for name in folders[key]:
            shutil.rmtree(out / name, ignore_errors=True)
        for path in files[key]:
            path.unlink(missing_ok=True)
    (out / "report.md").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--parts", default=",".join(PART_KEYS), help="comma-separated, from: " + ", ".join(PART_KEYS))
    p.add_argument("--plan", action="store_true", help="print the estimate and the budgets, run nothing")
    p.add_argument("--grid-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--combos", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    keys = tuple(k.strip() for k in args.parts.split(",") if k.strip())
    if not keys or set(keys) - set(PART_KEYS):
        p.error(f"--parts takes {', '.join(PART_KEYS)}, got '{args.parts}'")
    import torch

    from src.training.flops import PEAK_BF16_FLOPS, peak_flops

    cuda = torch.cuda.is_available()
    if not cuda and not args.plan:
        print(f"gpu-check: no CUDA GPU here (torch {torch.__version__}, CUDA build {torch.version.cuda}, "
              "torch.cuda.is_available() is False): nothing was run", file=sys.stderr)
        return 2
    if args.grid_worker:
        return grid_worker(args.out, [n for n in args.combos.split(",") if n])
    device_name = torch.cuda.get_device_name(0) if cuda else "no GPU (--plan: H100 assumed)"
    known_peak = peak_flops(torch.device("cuda", 0)) if cuda else None
    peak = known_peak or PEAK_BF16_FLOPS["H100"]
    parts = plan(peak, keys=keys)
    print(plan_table(parts, device_name, peak, known_peak is not None), flush=True)
    if args.plan:
        return 0

    from src.provenance import git_commit
    args.out.mkdir(parents=True, exist_ok=True)
    clear_outputs(args.out, tuple(part.key for part in parts))
    runners = {"tests": run_tests, "bench": run_bench, "grid": run_grid}
    start, spent_budget, results = time.monotonic(), 0.0, []
    for part in parts:
        spent_budget += part.budget_s
        deadline = start + spent_budget  # time a part leaves unused goes to the next
        print(f"\n== {part.title} (until {deadline - start:.0f} s)", flush=True)
        result = runners[part.key](args.out, deadline, part)
        print(f"   {'PASS' if result.ok else 'FAIL'} in {result.seconds:.0f} s: {result.summary}", flush=True)
        results.append(result)
    meta = dict(device=device_name, torch=torch.__version__, cuda=torch.version.cuda, commit=git_commit(),
                date=time.strftime("%Y-%m-%d %H:%M"))
    report = args.out / "report.md"
    report.write_text(report_markdown(results, meta))
    print(f"\nreport: {report}  ({'PASS' if exit_status(results) == 0 else 'FAIL'})")
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
