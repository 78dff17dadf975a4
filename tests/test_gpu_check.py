"""scripts/gpu_check.py (`make gpu-check`) without a GPU: the refusal, the estimate, the shards, the grid's restart
logic, the report written from fake run records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import scripts.gpu_check as gpu_check
from tests.conftest import ROOT

H100, A100 = 989e12, 312e12


def test_without_cuda_it_exits_2_at_once_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu-check"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no CUDA GPU" in proc.stderr and "nothing was run" in proc.stderr
    assert not out.exists()
    assert time.monotonic() - start < 60  # imports torch, then stops: no estimate, no tests


def test_the_estimate_fits_the_budget_on_an_h100_and_grows_on_a_slower_gpu():
    assert sum(gpu_check.BUDGETS.values()) == gpu_check.BUDGET_S == 540
    parts = gpu_check.plan(H100)
    assert [p.key for p in parts] == list(gpu_check.PART_KEYS)
    for part in parts:
        assert 0 < part.estimate_s <= part.budget_s, (part.key, part.estimate_s, part.budget_s)
    assert sum(p.estimate_s for p in parts) <= gpu_check.BUDGET_S
    slower = {p.key: p.estimate_s for p in gpu_check.plan(A100, keys=("bench", "grid"))}
    assert slower["bench"] > parts[1].estimate_s and slower["grid"] > parts[2].estimate_s
    assert gpu_check.plan(H100, keys=("grid",))[0].key == "grid"


def test_the_grid_estimate_is_derived_from_the_model_flops():
    """6N + 12·L·T·C per token (src/training/flops.py) for GPT-2 124M with the padded vocabulary, at an assumed MFU:
    the grid estimate moves with the GPU's peak exactly as its steps' FLOPs say."""
    layer = 2 * 768 + (768 * 2304 + 2304) + (768 * 768 + 768) + 2 * 768 + (768 * 3072 + 3072) + (3072 * 768 + 768)
    n = 12 * layer + 50304 * 768 + 2 * 768  # the tied wte/lm_head counts once, the learned wpe (a lookup) not
    assert gpu_check.flops_per_token(1024) == 6 * n + 12 * 12 * 1024 * 768
    a = gpu_check.Assumptions()
    # STEPS + 1: micro_batch_size=auto tries the first step's passes before the first step
    steps = len(gpu_check.combos()) * (gpu_check.STEPS + 1) * gpu_check.SEQUENCES_PER_STEP * gpu_check.CONTEXT
    expected = steps * gpu_check.flops_per_token(1024) / a.mfu_eager * (1 / A100 - 1 / H100)
    difference = gpu_check.estimate_grid(A100, a)[0] - gpu_check.estimate_grid(H100, a)[0]
    assert difference == pytest.approx(expected, rel=1e-9)


def test_the_bench_estimate_reads_the_commands_of_make_bench_gpu():
    from src.benchmark.grid import parse_args

    commands = gpu_check.bench_commands()
    assert len(commands) == 2 and all(parse_args(argv).compile == "on" for argv in commands)
    a = gpu_check.Assumptions()
    # at least one (warm) compile per model and cell: 4 PEs + the peer at T=1024, 2 attentions + the peer at 8192
    assert gpu_check.estimate_bench(H100, a)[0] > (5 + 3) * a.compile_124m_s


def test_flex_programs_count_one_per_attention_and_bias_pe():
    from src.model import PE_REGISTRY

    assert gpu_check.uses_flex("alibi", "flash") and not gpu_check.uses_flex("learned", "flash")
    assert gpu_check.uses_flex("learned", "linformer") and not gpu_check.uses_flex("alibi", "regular")
    bias_pes = [pe for pe in PE_REGISTRY.names() if PE_REGISTRY.entry(pe)[1].has_bias]
    # flash x each bias PE, linformer x (each bias PE + one shared program for the PEs without a bias)
    assert gpu_check.flex_programs(gpu_check.combos()) == len(bias_pes) + len(bias_pes) + 1


def test_the_grid_overrides_compose_to_the_124m_recipe_on_local_data():
    from src.model import model_config
    from src.structured import to_dataclass
    from src.training.config import TrainerConfig

    cfg = gpu_check.compose(gpu_check.grid_overrides("kerple", "linformer"))
    model = model_config(cfg.model)
    assert (model.n_layer, model.n_head, model.n_embd, model.block_size) == (12, 12, 768, gpu_check.CONTEXT)
    assert model.attention["name"] == "linformer" and model.pe["name"] == "kerple"
    assert (cfg.data.name, cfg.data.tokenizer, cfg.logger.name) == ("embedded", "gpt2", "none")
    assert not cfg.eval.hellaswag.enabled and not cfg.eval.extrapolation.enabled
    trainer = to_dataclass(TrainerConfig, cfg.trainer)
    assert trainer.micro_batch_size == "auto" and trainer.max_steps == gpu_check.STEPS and not trainer.compile
    assert trainer.total_batch_tokens == gpu_check.SEQUENCES_PER_STEP * gpu_check.CONTEXT
    assert (trainer.dtype, trainer.device, trainer.lr) == ("bfloat16", "cuda", OmegaConf.select(
        gpu_check.compose([f"experiment={gpu_check.RECIPE}"]), "trainer.lr"))


def test_the_shards_split_the_cuda_tests_without_overlap():
    """The last shard is the complement of the others: together they run what `pytest -m cuda` runs, once."""
    from _pytest.mark.expression import Expression

    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests/test_cuda.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(ids) > 100, proc.stdout[-2000:]

    def selected(expr: str) -> set[str]:
        def matches(node_id: str) -> bool:
            names = [*node_id.replace("::", "/").split("/"), "cuda", "skipif", "parametrize"]  # + its markers
            return Expression.compile(expr).evaluate(lambda sub, **_: any(sub.lower() in n.lower() for n in names))
        return {node_id for node_id in ids if matches(node_id)}

    shards = [selected(expr) for expr in gpu_check.SHARDS]
    assert all(shards), [len(s) for s in shards]
    assert sum(len(s) for s in shards) == len(ids) and set().union(*shards) == set(ids)


def test_junit_counts(tmp_path):
    path = tmp_path / "shard.xml"
    path.write_text('<testsuites><testsuite name="pytest">'
                    '<testcase classname="tests.test_cuda" name="test_a[x]"/>'
                    '<testcase classname="tests.test_cuda" name="test_b"><failure message="assert 1 == 2&#10;more">'
                    'trace</failure></testcase>'
                    '<testcase classname="tests.test_cuda" name="test_c"><error message="fixture broke"/></testcase>'
                    '<testcase classname="tests.test_cuda" name="test_d"><skipped message="needs 2 GPUs"/></testcase>'
                    '<testcase classname="tests.test_cuda" name="test_e"><skipped message="needs 2 GPUs"/></testcase>'
                    '</testsuite></testsuites>')
    counts = gpu_check.junit_counts(path)
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (1, 1, 1, 2)
    assert counts["failures"] == ["tests.test_cuda::test_b: assert 1 == 2", "tests.test_cuda::test_c: fixture broke"]
    assert counts["skip_reasons"] == {"needs 2 GPUs": 2}
    assert gpu_check.junit_counts(tmp_path / "missing.xml")["passed"] == 0


def test_a_command_past_its_deadline_is_stopped(tmp_path):
    start = time.monotonic()
    codes = gpu_check.run_until([([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "sleep.log"),
                                 ([sys.executable, "-c", "print('done')"], tmp_path / "quick.log")],
                                deadline=time.monotonic() + 3)
    assert codes == [None, 0] and time.monotonic() - start < 30
    assert (tmp_path / "quick.log").read_text().strip() == "done"


PAIRS = [("learned", "flash"), ("alibi", "flash"), ("fire", "linformer"), ("nope", "regular")]


def test_the_grid_restarts_its_worker_after_a_crash_and_reports_what_was_not_run(tmp_path, monkeypatch):
    """Worker 0 trains learned-flash and dies (exit -11) in alibi-flash; worker 1 trains fire-linformer and is
    stopped at the deadline in nope-regular: two failures named, the rest from the run records."""
    monkeypatch.setattr(gpu_check, "combos", lambda: PAIRS)
    grid_dir, calls = tmp_path / "grid", []

    def fake_run_until(commands, deadline, env=None):
        [(argv, log)] = commands
        names = argv[argv.index("--combos") + 1].split(",")
        calls.append(names)
        gpu_check.write_status(grid_dir, names[0], state="done", ok=True, error=None, seconds=1.0)
        gpu_check.write_status(grid_dir, names[1], state="running")
        return [-11 if len(calls) == 1 else None]

    monkeypatch.setattr(gpu_check, "run_until", fake_run_until)
    part = gpu_check.Part("grid", 99.0, 110.0, "")
    result = gpu_check.run_grid(tmp_path, time.monotonic() + 60, part)
    assert calls == [["learned-flash", "alibi-flash", "fire-linformer", "nope-regular"], ["fire-linformer",
                                                                                        "nope-regular"]]
    rows = {f"{r['pe']}-{r['attention']}": r for r in gpu_check.grid_rows(grid_dir, PAIRS)}
    assert rows["learned-flash"]["ok"] and rows["fire-linformer"]["ok"]
    assert "ended the worker (exit -11): see grid-worker0.log" in rows["alibi-flash"]["error"]
    assert "stopped at the deadline" in rows["nope-regular"]["error"]
    assert not result.ok and result.summary.startswith("2/4 combinations")


def test_a_worker_that_trains_nothing_is_not_restarted(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "combos", lambda: PAIRS[:2])
    monkeypatch.setattr(gpu_check, "run_until", lambda commands, deadline, env=None: [1])
    result = gpu_check.run_grid(tmp_path, time.monotonic() + 60, gpu_check.Part("grid", 1.0, 1.0, ""))
    rows = gpu_check.grid_rows(tmp_path / "grid", PAIRS[:2])
    assert not result.ok and all("the worker failed before training" in r["error"] for r in rows)


def write_run(grid_dir: Path, name: str, status: dict, summary: dict | None, losses: list[tuple[int, float]]) -> None:
    gpu_check.write_status(grid_dir, name, **status)
    run_dir = grid_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": v}) + "\n" for s, v in losses))


def test_the_report_from_fake_run_records(tmp_path):
    grid_dir = tmp_path / "grid"
    write_run(grid_dir, "learned-flash", dict(state="done", ok=True, error=None, seconds=4.25),
              {"status": "finished", "step": 20, "micro_batch_size": 8, "grad_accum": 1, "attention_backend": "sdpa",
               "perf/tokens_per_s": 412345.6, "perf/mfu": 0.3567, "perf/peak_mem_mb": 10240.0, "train/loss": 7.1},
              [(5, 10.9876), (20, 7.1234)])
    write_run(grid_dir, "alibi-flash", dict(state="done", ok=False, seconds=2.0,
                                            error="InductorError: NYI | head dims < 16"),
              {"status": "failed", "step": 0}, [])
    gpu_check.write_status(grid_dir, "fire-linformer", state="not run", ok=False, error="not run: out of budget",
                           seconds=None)
    rows = gpu_check.grid_rows(grid_dir, PAIRS[:3])
    table = gpu_check.grid_table(rows)
    assert table[2] == ("| learned | flash | PASS | 8 | 1 | sdpa | 412,346 | 35.7% | 10.0 | 10.988 (5) → 7.123 (20) | "
                        "4.2 |  |")
    assert table[3] == ("| alibi | flash | FAIL | – | – | – | – | – | – | – | 2.0 | "
                        "InductorError: NYI \\| head dims < 16 |")
    assert table[4].startswith("| fire | linformer | FAIL | – |") and "not run: out of budget" in table[4]

    results = [gpu_check.Result("tests", True, 95.2, 109.0, 120.0, "130 passed, 0 failed, 0 errors, 2 skipped"),
               gpu_check.Result("bench", False, 250.0, 249.0, 255.0, "5 PASS, 1 FAIL (exit 1)", ["| t |"]),
               gpu_check.Result("grid", False, 90.0, 99.0, 105.0, "1/3 combinations trained 20 steps", table)]
    report = gpu_check.report_markdown(results, dict(device="NVIDIA H100 80GB HBM3", torch="2.13.0", cuda="12.8",
                                                     commit="abc123", date="2026-12-02 10:00"))
    assert report.startswith("# GPU check: FAIL\n")
    assert "NVIDIA H100 80GB HBM3, torch 2.13.0 (CUDA 12.8), commit abc123" in report and "435 s of the 540 s" in report
    assert "| (i) CUDA tests: pytest -m cuda | PASS | 95 | 109 | 120 | 130 passed" in report
    assert "| (ii) make bench-gpu | FAIL | 250 | 249 | 255 | 5 PASS, 1 FAIL (exit 1) |" in report
    assert "## (iii) 20 steps of every PE x attention at 124M" in report and table[2] in report
    assert "| mfu_eager | 0.2 |" in report
    assert gpu_check.exit_status(results) == 1
    assert gpu_check.exit_status([results[0]]) == 0 and gpu_check.exit_status([]) == 1


def test_main_runs_the_parts_in_order_with_cumulative_deadlines_and_writes_the_report(tmp_path, monkeypatch, capsys):
    """The whole flow with the GPU faked and the parts replaced: the plan is printed first, each part gets the
    deadline start + its budget + the earlier parts' budgets, a failing part does not stop the next, exit 1."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    start, seen = time.monotonic(), []

    def fake(key: str, ok: bool):
        def run(out: Path, deadline: float, part) -> gpu_check.Result:
            seen.append((key, round(deadline - start)))
            return gpu_check.Result(key, ok, 1.0, part.estimate_s, part.budget_s, f"{key} done")
        return run

    monkeypatch.setattr(gpu_check, "run_tests", fake("tests", True))
    monkeypatch.setattr(gpu_check, "run_bench", fake("bench", False))
    monkeypatch.setattr(gpu_check, "run_grid", fake("grid", True))
    (tmp_path / "out" / "grid").mkdir(parents=True)
    (tmp_path / "out" / "grid" / "stale.txt").write_text("from an earlier check")
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 1
    assert [key for key, _ in seen] == ["tests", "bench", "grid"]
    assert [d for _, d in seen] == pytest.approx([150, 400, 540], abs=15)  # the plan's estimate takes seconds
    stdout = capsys.readouterr().out
    assert stdout.index("estimate") < stdout.index("== (i)") and "budget 540 s" in stdout
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.startswith("# GPU check: FAIL") and "NVIDIA H100 80GB HBM3" in report and "bench done" in report
    assert not (tmp_path / "out" / "grid").exists()  # an earlier check's outputs are cleared first
    (tmp_path / "out" / "bench-gpu").mkdir()
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--parts", "tests"]) == 0
    assert (tmp_path / "out" / "bench-gpu").is_dir()  # --parts clears only what the parts it runs write
