"""The benchmark harness (src/benchmark/grid.py, src/benchmark/): outputs and bookkeeping, never timings."""

import json

import matplotlib.image
import pytest
import torch
from conftest import ATTENTIONS, PES

from src.benchmark import grid as bench
from src.benchmark.memory import step_peak_mib
from src.benchmark.peer import PEER_NAME, PeerGPT2
from src.model import build_model, model_config

TINY = ["--quick", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--vocab-size", "97",
        "--linformer-chunk", "8", "--linformer-k", "2", "--batch", "2", "--repeats", "2", "--steps", "1"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    status = bench.main(TINY + ["--context", "16", "32", "--out", str(out)])
    return status, out


def test_quick_mode_writes_a_row_per_combination_and_the_peer(quick_run):
    status, out = quick_run
    assert status == 0
    result = json.loads((out / "bench.json").read_text())
    rows = result["results"]
    expected = {(pe, attention, T) for pe in PES for attention in ATTENTIONS for T in (16, 32)}
    ours = [r for r in rows if r["model"] == "pegrid"]
    assert {(r["pe"], r["attention"], r["context"]) for r in ours} == expected and len(ours) == len(expected)
    peers = [r for r in rows if r["model"] == PEER_NAME]
    assert sorted(r["context"] for r in peers) == [16, 32]
    for r in rows:
        assert r["error"] is None
        assert r["tokens_per_s"] > 0 and len(r["tokens_per_s_rounds"]) == (2 * 21 if r in peers else 2)
        assert r["mfu"] is None  # CPU: no peak FLOP/s to divide by
        assert r["step_mem_mib"] is not None and r["state_mem_mib"] > 0
        assert (r["vs_peer"] is None) == (r in peers)
    assert result["meta"]["threads"] == 1 and len(result["meta"]["load_avg_after"]) == 3


def test_quick_mode_writes_markdown_and_png(quick_run):
    _, out = quick_run
    md = (out / "bench.md").read_text()
    assert md.count(f"| {PEER_NAME} |") == 2
    assert "| off | 32 | 2 | fire+linformer |" in md
    assert matplotlib.image.imread(out / "bench.png").shape[-1] in (3, 4)


def test_peer_has_our_architecture():
    """learned+flash vs the peer is the apples-to-apples pair: the same parameters and the same FLOPs."""
    cfg = model_config(bench.model_cfg(bench.parse_args(TINY + ["--context", "32"]), "learned", "flash"))
    ours, peer = build_model(cfg), PeerGPT2(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in peer.parameters())
    from src.training.flops import flops_per_token

    assert peer.flops_per_token(32) == flops_per_token(ours, 32)
    idx = torch.randint(cfg.vocab_size, (2, 32))
    logits, loss = peer(idx, idx)
    assert logits.shape == (2, 32, cfg.vocab_size) and loss.shape == ()


def test_cpu_step_memory_sees_a_torch_allocation():
    mib = step_peak_mib(lambda: torch.ones(64, 2**20).sum(), torch.device("cpu"))  # a 256 MiB tensor
    assert 240 < mib < 400


def test_a_failing_combination_is_reported_not_fatal(tmp_path):
    """An OOM at one long context must not cost the rest of a GPU grid; an invalid Linformer config stands in."""
    status = bench.main(TINY + ["--pes", "nope", "--attentions", "linformer", "--linformer-k", "8",
                                "--context", "16", "--out", str(tmp_path)])
    assert status == 1
    row = json.loads((tmp_path / "bench.json").read_text())["results"][0]
    assert row["tokens_per_s"] is None and row["error"].startswith("ValueError")
    assert (tmp_path / "bench.md").exists() and (tmp_path / "bench.png").exists()


def _gpu_result(context: int, rows: list[tuple[str, str, float, float | None, float]]) -> dict:
    """A bench.json as an H100 run would write it: rows of (pe, attention, vs_peer, mfu, step MiB)."""
    meta = dict(device="NVIDIA H100", device_type="cuda", n_layer=12, n_head=12, n_embd=768, vocab_size=50304)
    cell = dict(context=context, batch=16, compile=True, dtype="bfloat16")
    results = [dict(model="pegrid", pe=pe, attention=attention, **cell, tokens_per_s=1000 * vs_peer,
                    vs_peer=vs_peer, mfu=mfu, step_mem_mib=mem, state_mem_mib=1000.0, error=None)
               for pe, attention, vs_peer, mfu, mem in rows]
    results.append(dict(model=PEER_NAME, pe="learned", attention="sdpa", **cell, tokens_per_s=1000.0, vs_peer=None,
                        mfu=0.4, step_mem_mib=9000.0, state_mem_mib=1000.0, error=None))
    return dict(meta=meta, results=results)


def test_targets_pass_fail_and_not_measured(tmp_path, capsys):
    from src.benchmark import targets

    t1024 = _gpu_result(1024, [("learned", "flash", 1.05, 0.52, 9000.0), ("alibi", "flash", 0.90, 0.4, 9000.0),
                               ("kerple", "flash", 0.70, 0.3, 9000.0), ("fire", "flash", 0.85, 0.3, 13000.0)])
    lines = {line["target"].split(" (")[0]: line for line in targets.check([t1024])}
    assert lines["learned+flash tokens/s ÷ peer"]["passed"] is True
    assert lines["learned+flash MFU"]["passed"] is True
    assert lines["alibi+flash tokens/s ÷ learned+flash"]["value"] == pytest.approx(0.90 / 1.05)
    assert lines["kerple+flash tokens/s ÷ learned+flash"]["passed"] is False  # 0.67 < 0.8
    fire_memory = lines["fire+flash peak memory ÷ learned+flash"]
    assert fire_memory["value"] == pytest.approx(14000 / 10000) and fire_memory["passed"] is False
    assert lines["learned+linformer tokens/s ÷ learned+flash"]["passed"] is None  # no T=8192 file given

    path = tmp_path / "bench.json"
    path.write_text(json.dumps(t1024))
    assert targets.main([str(path), "--out", str(tmp_path / "targets.md")]) == 1  # a measured target failed
    assert "| FAIL |" in (tmp_path / "targets.md").read_text() and "not measured" in capsys.readouterr().out
    t8192 = _gpu_result(8192, [("learned", "flash", 1.0, 0.5, 20000.0), ("learned", "linformer", 1.6, 0.2, 9000.0)])
    lines = {line["target"].split(" (")[0]: line for line in targets.check([t8192])}
    assert lines["learned+linformer tokens/s ÷ learned+flash"]["passed"] is True
    assert targets.main([str(tmp_path / "missing.json")]) == 2


def test_targets_check_the_cpu_target_on_a_quick_run(quick_run):
    from src.benchmark import targets

    _, out = quick_run
    lines = targets.check([json.loads((out / "bench.json").read_text())])
    cpu = [line for line in lines if "CPU" in line["target"]]
    assert [line["cell"].split(") ")[1] for line in cpu] == ["T=16 B=2", "T=32 B=2"]
    assert all(line["value"] > 0 and line["passed"] is not None for line in cpu)
    assert all(line["passed"] is None for line in lines if "GPU" in line["target"])


def test_profile_writes_an_op_table_and_a_trace_per_combination(tmp_path):
    status = bench.main(TINY + ["--context", "16", "--pes", "fire", "--attentions", "flash", "--profile",
                                "--out", str(tmp_path)])
    assert status == 0
    for combo in ("fire+flash", PEER_NAME):
        table = (tmp_path / "profiles" / f"T16-B2-eager-{combo}.txt").read_text()
        assert "aten::mm" in table and "Self CPU" in table
        trace = json.loads((tmp_path / "profiles" / f"T16-B2-eager-{combo}.trace.json").read_text())
        assert trace["traceEvents"]
