"""The benchmark harness (src/benchmark/grid.py, src/benchmark/): outputs and bookkeeping, never timings."""

import json

import matplotlib.image
import pytest
import torch

from src.benchmark import grid as bench
from src.benchmark.memory import step_peak_mib
from src.benchmark.peer import PEER_NAME, PeerGPT2
from src.model import ATTENTION_REGISTRY, PE_REGISTRY, build_model, model_config
from tests.conftest import ATTENTIONS, PES

TINY = ["--quick", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--vocab-size", "97", "--batch", "2",
        "--repeats", "2", "--steps", "1"]


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
        # the peer ran a round next to each of the 2 rounds of every combination of its cell
        assert r["tokens_per_s"] > 0 and len(r["tokens_per_s_rounds"]) == 2 * (len(PES) * len(ATTENTIONS)
                                                                                if r in peers else 1)
        assert r["mfu"] is None  # CPU: no peak FLOP/s to divide by
        assert r["step_mem_mib"] is not None and r["state_mem_mib"] > 0
        assert (r["vs_peer"] is None) == (r in peers)
    assert result["meta"]["threads"] == 1 and len(result["meta"]["load_avg_after"]) == 3


def test_every_component_is_built_for_the_longest_context_and_recorded(quick_run):
    """Through its schema's `for_context` hook (Linformer: 32 tokens -> chunks of 8, 2 slots), for every PE and
    attention alike; bench.json's meta records what that set, bench.md says it."""
    _, out = quick_run
    components = json.loads((out / "bench.json").read_text())["meta"]["components"]
    expected = {"block_size": 32}
    for group, registry, names in (("pe", PE_REGISTRY, PES), ("attention", ATTENTION_REGISTRY, ATTENTIONS)):
        expected[group] = {name: registry.entry(name)[0].for_context(32) for name in names}
    assert components == expected
    args = bench.parse_args(TINY + ["--context", "16", "32"])
    for pe in PES:
        for attention in ATTENTIONS:
            model = build_model(bench.model_cfg(args, pe, attention))
            assert model.config.block_size == 32
            built = {"pe": (model.h[0].attn.pe or model.pe).cfg, "attention": model.h[0].attn.mechanism.cfg}
            for group, name in (("pe", pe), ("attention", attention)):
                assert all(getattr(built[group], k) == v for k, v in expected[group][name].items()), (group, name)
    assert f"- PE / attention settings: {bench.report.components_text(components)}\n" in (out / "bench.md").read_text()


def test_quick_mode_writes_markdown_and_png(quick_run):
    _, out = quick_run
    md = (out / "bench.md").read_text()
    assert md.count(f"| {PEER_NAME} |") == 2
    for pe in PES:
        for attention in ATTENTIONS:
            assert f"| off | 32 | 2 | {pe}+{attention} |" in md
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


def test_a_failing_combination_is_reported_not_fatal(tmp_path, monkeypatch):
    """An OOM at one long context must not cost the rest of a GPU grid; a model that fails to build stands in."""
    pe, failing, working = PES[0], ATTENTIONS[0], ATTENTIONS[1]

    def build(cfg):
        if cfg["attention"]["name"] == failing:
            raise ValueError("stand-in for an out-of-memory error")
        return build_model(cfg)

    monkeypatch.setattr(bench, "build_model", build)
    status = bench.main(TINY + ["--pes", pe, "--attentions", failing, working, "--context", "16",
                                "--out", str(tmp_path)])
    assert status == 1
    rows = {PEER_NAME if r["model"] == PEER_NAME else r["attention"]: r
            for r in json.loads((tmp_path / "bench.json").read_text())["results"]}
    assert rows[failing]["tokens_per_s"] is None and rows[failing]["error"].startswith("ValueError: stand-in")
    assert rows[working]["error"] is None and rows[working]["tokens_per_s"] > 0  # the grid went on
    assert rows[PEER_NAME]["error"] is None  # the peer too
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
