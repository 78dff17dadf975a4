"""The analysis tool (analysis/) on run records of real tiny training runs: tables, W&B loading and its
Parquet cache (the real W&B SDK over a fake transport, tests/wandb_fake.py), figure content, and the CLI end to end."""

from __future__ import annotations

import json
import re
import runpy
import shutil
import subprocess
import sys

import matplotlib.colors
import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from matplotlib.lines import Line2D
from omegaconf import OmegaConf

from analysis import compare, experiment_setup, figures, sources, stats, style, tables
from analysis.report import FIGURE_TITLES, warnings
from analysis.sources import WandbUnavailable, combine, load_local, load_wandb
from src.training.trainer import train
from tests.conftest import ROOT
from tests.train_helpers import compose_train, tiny_overrides
from tests.wandb_fake import ServerRun, fake_api, read_records, replay_run_record

# (pe, attention, seed): 2 PEs x 2 attentions with rope/flash missing (an n/a heatmap cell) and a second
# seed of rope/regular.
TRAINED = [("rope", "regular", 1), ("rope", "regular", 2), ("learned", "flash", 1), ("learned", "regular", 1)]
MULTIPLIERS = [1, 2, 4]
HELLASWAG_ITEMS = [
    ("A man sits down at the piano and", ["plays a song.", "eats the piano.", "flies away.", "melts."], 0),
    ("A dog runs across the park", ["chasing a ball.", "and flies away.", "to its owner.", "backwards."], 1),
]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """<root>/tiny/<pe>-<attention>-s<seed>/ as a sweep writes them, plus two fabricated records:
    tiny/learned-flash-s2 (failed, no evaluation) and other/rope-regular-s1 (still running, same run name
    as tiny/rope-regular-s1)."""
    root = tmp_path_factory.mktemp("runs")
    data_dir = tmp_path_factory.mktemp("data_cache")
    hellaswag = root.parent / "hellaswag_val.jsonl"
    hellaswag.write_text("".join(json.dumps({"ctx": c, "endings": e, "label": label}) + "\n"
                                 for c, e, label in HELLASWAG_ITEMS))
    for pe, attention, seed in TRAINED:
        name = f"{pe}-{attention}-s{seed}"
        extra = [f"model/pe={pe}", f"model/attention={attention}", f"trainer.seed={seed}", "sweep_name=tiny",
                 f"run_name={name}", f"eval.extrapolation.multipliers=[{','.join(map(str, MULTIPLIERS))}]",
                 "eval.hellaswag.enabled=true", f"eval.hellaswag.path={hellaswag}", "trainer.ckpt_every=0"]
        train(compose_train(tiny_overrides(data_dir, steps=3, extra=extra)), root / "tiny" / name)

    failed = root / "tiny" / "learned-flash-s2"
    shutil.copytree(root / "tiny" / "learned-flash-s1", failed, ignore=shutil.ignore_patterns("checkpoints"))
    summary = json.loads((failed / "summary.json").read_text())
    summary = {k: v for k, v in summary.items() if not k.startswith(("val/", "extrapolation/", "hellaswag/"))}
    summary.update(status="failed", error="TrainingDiverged: loss became nan at step 3", seed=2,
                   run_name="learned-flash-s2")
    (failed / "summary.json").write_text(json.dumps(summary))
    config = OmegaConf.load(failed / "config.yaml")
    config.trainer.seed, config.run_name = 2, "learned-flash-s2"
    OmegaConf.save(config, failed / "config.yaml")
    training_rows = [line for line in (failed / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in line]
    (failed / "metrics.jsonl").write_text("\n".join(training_rows) + "\n")

    running = root / "other" / "rope-regular-s1"
    shutil.copytree(root / "tiny" / "rope-regular-s1", running, ignore=shutil.ignore_patterns("checkpoints"))
    summary = json.loads((running / "summary.json").read_text())
    keep = ("pe", "attention", "seed", "run_name", "num_params")
    (running / "summary.json").write_text(json.dumps({**{k: summary[k] for k in keep}, "status": "running",
                                                      "sweep": "other", "step": 2}))
    (running / "metrics.jsonl").write_text("".join((running / "metrics.jsonl").read_text().splitlines(True)[:2]))
    return root


@pytest.fixture(scope="module")
def local(runs_root):
    return combine([load_local([runs_root])])


def run_of(runs: pd.DataFrame, run_id_suffix: str) -> dict:
    [row] = runs[runs["run_id"].str.endswith(run_id_suffix)].to_dict("records")
    return row


def test_local_run_records_become_tidy_tables(local, runs_root):
    runs, history = local.runs, local.history
    assert len(runs) == 6 and runs["run_id"].is_unique and runs["label"].is_unique
    assert sorted(runs["status"]) == ["failed", "finished", "finished", "finished", "finished", "running"]
    # the duplicate run name is kept twice and told apart by its run dir
    duplicates = runs[runs["name"] == "rope-regular-s1"]
    assert len(duplicates) == 2
    assert all(f"[{run_id}]" in label for run_id, label in zip(duplicates["run_id"], duplicates["label"]))

    rope = run_of(runs, "tiny/rope-regular-s2")
    identity = (rope["pe"], rope["attention"], rope["seed"], rope["sweep"], rope["step"])
    assert identity == ("rope", "regular", 2, "tiny", 3)
    assert np.isfinite([rope["val/loss"], rope["hellaswag/acc_norm"], rope["extrapolation/loss_x4"]]).all()
    assert rope["extrapolation/context_x4"] == 4 * 32 and rope["tokens"] == 3 * 128
    learned = run_of(runs, "tiny/learned-flash-s1")
    assert np.isfinite(learned["extrapolation/loss_x1"]) and np.isnan(learned["extrapolation/loss_x2"])
    assert runs["perf/mfu"].isna().all() and (runs["perf/tokens_per_s"] > 0).all()

    failed = run_of(runs, "tiny/learned-flash-s2")
    assert failed["error"].startswith("TrainingDiverged") and np.isnan(failed["val/loss"])
    running = run_of(runs, "other/rope-regular-s1")  # no final metrics in its summary: taken from its history
    assert running["sweep"] == "other" and np.isfinite(running["train/loss"]) and running["tokens"] == 2 * 128

    steps = history[history["run_id"] == rope["run_id"]]
    assert list(steps["step"]) == [1, 2, 3]  # the step-3 training and evaluation rows are merged
    last = steps.iloc[-1]
    assert last["val/loss"] == rope["val/loss"] and last["tokens"] == 3 * 128 and np.isfinite(last["train/loss"])


def test_final_metrics_table_aggregates_seeds_and_marks_status(local):
    table = tables.combination_table(local.runs).set_index(["sweep", "pe", "attention"])
    rope = table.loc[("tiny", "rope", "regular")]
    seeds = local.runs[(local.runs["sweep"] == "tiny") & (local.runs["pe"] == "rope")]["val/loss"]
    assert rope["runs"] == 2 and rope["seeds"] == "1, 2" and rope["status"] == "2 finished" and rope["n"] == 2
    assert rope["val/loss mean"] == pytest.approx(seeds.mean())
    # 95 % CI half-width, Student's t with n-1 = 1 degree of freedom
    assert rope["val/loss ci95"] == pytest.approx(12.7062047 * seeds.std() / np.sqrt(2))
    learned = table.loc[("tiny", "learned", "flash")]  # the failed seed is counted, not averaged
    assert learned["status"] == "1 finished, 1 failed" and learned["unfinished"] == "" and learned["n"] == 1
    assert np.isfinite(learned["val/loss mean"]) and np.isnan(learned["val/loss ci95"])
    assert learned[tables.LIMIT] == 1 and np.isnan(rope[tables.LIMIT])  # learned cannot run past 1x
    assert table.loc[("other", "rope", "regular"), "unfinished"] == "running"

    markdown = tables.combination_markdown(tables.combination_table(local.runs), local.runs)
    assert "validation loss (nats)" in markdown and " ± " in markdown and "n/a" in markdown
    assert markdown.count("\n") == 2 + len(table)


def tiny_sweep(local) -> pd.DataFrame:
    return local.runs[local.runs["sweep"] == "tiny"].reset_index(drop=True)


def markdown_rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in markdown.splitlines()[2:]]


def test_t_quantile_is_students():
    for dof, expected in [(1, 12.7062), (2, 4.3027), (3, 3.1824), (9, 2.2622), (30, 2.0423), (200, 1.9719)]:
        assert stats.t_quantile(dof) == pytest.approx(expected, abs=1e-4)
    mean, half, n = stats.mean_ci([1.0, 2.0, 3.0, float("nan")])
    assert (mean, n) == (2.0, 3) and half == pytest.approx(4.3027 * 1.0 / np.sqrt(3), abs=1e-4)
    assert stats.mean_ci([5.0])[:2] == (5.0, pytest.approx(float("nan"), nan_ok=True))


def test_loss_table_bold_best_ci_and_learned_cannot_run_past_1x(local):
    table = tables.loss_table(tiny_sweep(local))
    assert table.columns == ["val/loss", "extrapolation/delta_x2", "extrapolation/delta_x4", "hellaswag/acc_norm"]
    assert table.identity == ["pe", "attention", "n", "status"] and table.constant == ["sweep: tiny"]
    assert table.dropped == []
    rows = {(r[0], r[1]): r for r in markdown_rows(tables.paper_markdown(table))}
    assert list(rows) == [("learned", "regular"), ("learned", "flash"), ("rope", "regular")]  # PE order
    learned, rope = rows[("learned", "flash")], rows[("rope", "regular")]  # PE, attention, n, status, metrics
    assert learned[5:7] == ["cannot run past 1×", "cannot run past 1×"]  # not n/a, not a number
    assert learned[2] == "1" and learned[3] == "1 finished, 1 failed"

    runs = tables.with_deltas(tiny_sweep(local))
    seeds = runs[(runs["pe"] == "rope")]
    mean, half, n = stats.mean_ci(seeds["extrapolation/delta_x4"])
    assert rope[2] == "2" and n == 2
    assert rope[6].strip("*") == tables.metrics.format_mean_ci("extrapolation/delta_x4", mean, half)
    assert " ± " in rope[4] and " ± " in rope[5]

    # bold: the lowest val loss among finished combinations, and only that one (limit cells never)
    best = runs[runs["status"] == "finished"].groupby(["pe", "attention"])["val/loss"].mean().idxmin()
    assert [key for key, r in rows.items() if r[4].startswith("**")] == [best]
    assert not any(c.startswith("**") for r in rows.values() for c in r[5:7] if "cannot" in c)

    latex = tables.paper_latex(table)
    assert "\\multicolumn{2}{c}{cannot run past 1$\\times$}" in latex and "\\textbf{" in latex
    assert "$\\pm$" in latex and "\\toprule" in latex and "acc\\textsubscript{norm}" in latex
    assert "Sweep: tiny for every run.}" in latex
    underscored = tables.paper_latex(tables.loss_table(tiny_sweep(local).assign(sweep="study_cpu")))
    assert "Sweep: study\\_cpu for every run.}" in underscored  # escaped once


def test_all_na_columns_are_dropped_with_their_reason(local):
    runs = tiny_sweep(local).assign(**{"hellaswag/acc_norm": np.nan, "eval.hellaswag.enabled": "false"})
    table = tables.loss_table(runs)
    assert "hellaswag/acc_norm" not in table.columns
    assert table.dropped == ["HellaSwag acc_norm: not evaluated (eval.hellaswag.enabled=false in every run, as in "
                             "the offline eval preset)"]
    assert "HellaSwag" not in tables.paper_markdown(table) and "HellaSwag" not in table.caption
    bytes_runs = runs.assign(**{"data.tokenizer": "bytes"})
    assert "needs the GPT-2 BPE tokenizer" in tables.loss_table(bytes_runs).dropped[0]

    efficiency = tables.efficiency_table(tiny_sweep(local))
    assert efficiency.columns == ["perf/tokens_per_s", "perf/peak_mem_mb", "time/elapsed_s"]
    assert efficiency.dropped == ["MFU: null off-GPU (the runs trained on the CPU)"]
    assert "MFU" not in tables.paper_markdown(efficiency) and "MFU" not in tables.paper_latex(efficiency).split(
        "\\toprule")[1]


def test_seed_warning_is_visible_with_one_seed(local):
    one_seed = local.runs[(local.runs["seed"] == 1) & (local.runs["sweep"] == "tiny")]
    [warning] = warnings(tables.loss_table(one_seed))
    assert warning.startswith("> ⚠️ **One seed per combination (n = 1).**") and "95 % CI" in warning
    lines = warnings(tables.loss_table(tiny_sweep(local)))
    assert lines == ["> ⚠️ **n = 1 for 2 of 3 combinations** (learned/regular, learned/flash): shown without a "
                     "confidence interval.\n"]
    two_seeds = tiny_sweep(local)[lambda r: r["pe"] == "rope"]
    assert warnings(tables.loss_table(two_seeds)) == []


def test_setup_section_reads_config_and_summary(local):
    lines = "\n".join(experiment_setup.setup_lines(tiny_sweep(local)))
    assert "2 layers, 4 heads, width 32, training context L = 32 tokens, vocabulary 50,304" in lines
    assert "- **Data**: embedded; tokenizer GPT-2 BPE (tiktoken `gpt2`, 50257 ids)" in lines
    assert "3 steps of 128 tokens (384 tokens seen)" in lines and "linear warm-up over 1 step," in lines
    assert "validation loss on 512 held-out tokens, at the end of training" in lines
    assert "loss at 1×, 2×, 4× L = 32, 64, 128 tokens, 512 tokens each" in lines
    assert "HellaSwag: acc_norm on 2 validation items (4 of 4 runs)" in lines
    assert "- **Seeds**: 1, 2; n = 1–2 per combination" in lines
    assert "device cpu, world size 1" in lines and "torch " in lines
    params = tiny_sweep(local)["num_params"]  # learned's position table makes it larger than rope
    assert params.nunique() == 2 and f"{params.min() / 1e6:.3f}–{params.max() / 1e6:.3f} M" in lines
    assert lines.endswith(experiment_setup.DIFFER_NOTE)

    assert experiment_setup.describe(pd.Series([0.1e6, 0.12e6]), experiment_setup._millions, " M") == (
        "0.100–0.120 M")
    assert experiment_setup.describe(pd.Series(["cpu", "cuda", "cpu"])) == "cpu, cuda"
    assert experiment_setup.describe(pd.Series([None, None], dtype="str")) == "not recorded"


def test_hidden_directories_are_not_run_records(runs_root, tmp_path):
    """A sweep moves superseded records to <sweep>/.superseded/; .sweep_logs/ and .hydra/ are not runs either."""
    sweep = tmp_path / ".outputs" / "study"  # a hidden directory above the root given is fine
    shutil.copytree(runs_root / "tiny" / "rope-regular-s1", sweep / "rope-regular-s1",
                    ignore=shutil.ignore_patterns("checkpoints"))
    for hidden in (".superseded/rope-regular-s1-20260101-000000", ".sweep_logs/0", "rope-regular-s1/.hydra"):
        shutil.copytree(sweep / "rope-regular-s1", sweep / hidden, ignore=shutil.ignore_patterns(".hydra"))
    interrupted = json.loads((sweep / "rope-regular-s1" / "summary.json").read_text()) | {"status": "interrupted"}
    (sweep / "rope-regular-s1" / "summary.json").write_text(json.dumps(interrupted))
    runs = load_local([sweep.parent]).runs
    assert list(runs["run_id"]) == [(sweep / "rope-regular-s1").as_posix()]
    assert list(runs["status"]) == ["interrupted"]
    assert sources.find_run_dirs(sweep / ".superseded") == [(sweep / ".superseded" / "rope-regular-s1-20260101-000000")]


def test_style_orders_pes_and_attentions_from_the_registries():
    from src.model import ATTENTION_REGISTRY, PE_REGISTRY

    papers_order = ["learned", "sinusoidal", "rope", "alibi", "kerple", "fire", "nope"]
    assert style.PE_ORDER[:len(papers_order)] == papers_order
    assert set(style.PE_ORDER) == set(PE_REGISTRY.names()) and set(style.ATTENTION_ORDER) == set(
        ATTENTION_REGISTRY.names())
    assert style.ordered(["zeta", "nope", "rope", "learned"], style.PE_ORDER) == ["learned", "rope", "nope", "zeta"]
    colours = [style.pe_color(pe) for pe in style.PE_ORDER]
    assert len(set(colours)) == len(colours)  # one colour per registered PE
    # a name no registry knows still gets a fixed style, never a KeyError
    assert style.pe_color("zeta") == style.pe_color("zeta") and style.attention_linestyle("sdpa")
    assert style.attention_hatch("sdpa") and style.attention_marker("sdpa")
    pairs = [("rope", "flash"), ("learned", "sdpa"), ("learned", "regular")]
    assert sorted(pairs, key=lambda c: style.order_key(*c)) == [("learned", "regular"), ("learned", "sdpa"),
                                                                 ("rope", "flash")]


def test_the_known_styles_stay_and_newcomers_get_distinct_ones(monkeypatch):
    """The papers' PEs and attentions look as they always have; PEs / attentions registered without a style.py entry
    (more of them than there are spares) each get their own colour / line style / hatch / marker."""
    assert [style.pe_color(pe) for pe in ["learned", "sinusoidal", "rope", "alibi", "kerple", "fire", "nope"]] == [
        "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000"]
    known = ["regular", "flash", "linformer"]
    assert [style.attention_linestyle(a) for a in known] == ["-", "--", ":"]
    assert [style.attention_hatch(a) for a in known] == ["", "//", ".."]
    assert [style.attention_marker(a) for a in known] == ["o", "s", "^"]

    monkeypatch.setattr(style, "PE_ORDER", style.PE_ORDER + [f"new_pe_{i}" for i in range(12)])
    monkeypatch.setattr(style, "ATTENTION_ORDER", style.ATTENTION_ORDER + [f"new_attention_{i}" for i in range(12)])
    colours = [matplotlib.colors.to_hex(style.pe_color(pe)) for pe in style.PE_ORDER]
    assert len(set(colours)) == len(colours) and matplotlib.colors.to_hex(style.BASELINE_STYLE["color"]) not in colours
    for attribute in (style.attention_linestyle, style.attention_hatch, style.attention_marker):
        drawn = [str(attribute(a)) for a in style.ATTENTION_ORDER]
        assert len(set(drawn)) == len(drawn), attribute.__name__
    for attention in style.ATTENTION_ORDER:  # matplotlib accepts every one of them
        Line2D([], [], linestyle=style.attention_linestyle(attention), marker=style.attention_marker(attention))
    assert not set(map(str, (style.attention_marker(a) for a in style.ATTENTION_ORDER))) & set(
        style.STATUS_MARKERS.values())


def test_bench_plot_uses_the_report_colours_and_order():
    import matplotlib.pyplot as plt

    from src.benchmark import report as bench_report
    from src.benchmark.peer import PEER_NAME

    def row(model, pe, attention, context, tokens_per_s=100.0):
        return {"model": model, "pe": pe, "attention": attention, "context": context, "batch": 2, "compile": False,
                "tokens_per_s": tokens_per_s, "step_mem_mib": 10.0 + context}

    combos = [("rope", "regular"), ("alibi", "flash"), ("learned", "flash"), ("fire", "linformer"),
              ("nope", "new_attention")]  # results come alphabetically; an attention style.py has no entry for
    results = [row(PEER_NAME, "learned", "sdpa", t) for t in (16, 32)]
    results += [row("pegrid", pe, attention, t) for pe, attention in sorted(combos) for t in (16, 32)]
    results.append({**row("pegrid", "kerple", "regular", 16), "tokens_per_s": None})  # a failed measurement
    fig = bench_report.figure({"results": results})
    try:
        tokens_ax, memory_ax = fig.axes
        labels = [line.get_label() for line in tokens_ax.lines]
        assert labels == [PEER_NAME, "learned+flash", "rope+regular", "alibi+flash", "fire+linformer",
                          "nope+new_attention"]
        for line in tokens_ax.lines[1:]:
            pe, attention = line.get_label().split("+")
            assert matplotlib.colors.same_color(line.get_color(), style.pe_color(pe))
            expected = Line2D([], [], linestyle=style.attention_linestyle(attention))
            assert line.get_linestyle() == expected.get_linestyle()
            assert line.get_marker() == style.attention_marker(attention)
        peer = tokens_ax.lines[0]
        assert matplotlib.colors.same_color(peer.get_color(), style.BASELINE_STYLE["color"])
        assert not any(matplotlib.colors.same_color(peer.get_color(), style.pe_color(pe)) for pe in style.PE_ORDER)
        assert [t.get_text() for t in memory_ax.get_xticklabels()] == ["16", "32"]
    finally:
        plt.close(fig)
    assert bench_report.figure({"results": [results[-1]]}) is None


@pytest.fixture(scope="module")
def wandb_server(runs_root, tmp_path_factory):
    """The tiny sweep's run records as a W&B server holds them once uploaded: each logged through the trainer's
    own WandbLogger with the real SDK (offline), its transaction log read back (tests/wandb_fake.py)."""
    out = tmp_path_factory.mktemp("wandb_replay")
    with pytest.MonkeyPatch.context() as env:
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            env.setenv(var, str(out / var.lower()))
        env.setenv("WANDB_MODE", "offline")
        logs = [replay_run_record(d, out / d.name) for d in sorted((runs_root / "tiny").iterdir())]
    return [ServerRun.from_records(read_records(log)) for log in logs]


@pytest.mark.slow
def test_wandb_runs_load_like_local_ones_and_are_cached(wandb_server, local, tmp_path):
    apis = []

    def api_factory():  # a real wandb.Api over a fake transport (tests/wandb_fake.py)
        apis.append(fake_api(wandb_server, "team", "pegrid"))
        return apis[-1]

    loaded = load_wandb("team/pegrid", "tiny", tmp_path, api_factory=api_factory)
    [api] = apis
    requests = api._service_api.requests
    assert [v["filters"] for op, v in requests if op == "Runs"] == [json.dumps({"group": "tiny"})]
    assert sum(op == "scan_run_history_init" for op, _ in requests) == 5  # scan_history, not sampled history()
    runs = loaded.runs.set_index("name").sort_index()
    expected = local.runs[local.runs["sweep"] == "tiny"].set_index("name").sort_index()
    for column in ["pe", "attention", "seed", "sweep", "status", "val/loss", "hellaswag/acc_norm", "tokens",
                   "extrapolation/loss_x2", "perf/tokens_per_s", "model.n_layer", "trainer.max_steps", "device"]:
        pd.testing.assert_series_equal(runs[column], expected[column], check_names=False)
    assert set(loaded.runs["run_id"]) == {f"team/pegrid/{r.run_id}" for r in wandb_server}
    assert list(loaded.runs.columns) == list(local.runs.columns)  # no W&B-only column (its step metric)
    for run in wandb_server:  # the same histories, but for perf/mfu: None on CPU, which W&B is not sent
        history = loaded.history[loaded.history["run_id"] == f"team/pegrid/{run.run_id}"].drop(columns="run_id")
        local_id = expected.loc[run.display_name, "run_id"]
        local_history = local.history[local.history["run_id"] == local_id].drop(columns=["run_id", "perf/mfu"])
        pd.testing.assert_frame_equal(history.dropna(axis=1, how="all").reset_index(drop=True),
                                      local_history.dropna(axis=1, how="all").reset_index(drop=True),
                                      check_like=True)
    assert "_runtime" not in loaded.history and not any(c.startswith("report/") for c in loaded.history)

    def unreachable():
        raise AssertionError("the cache should have answered")

    cached = load_wandb("team/pegrid", "tiny", tmp_path, api_factory=unreachable)
    pd.testing.assert_frame_equal(cached.runs, loaded.runs)
    pd.testing.assert_frame_equal(cached.history, loaded.history)
    load_wandb("team/pegrid", "tiny", tmp_path, refresh=True, api_factory=api_factory)
    assert len(apis) == 2


def test_wandb_unavailable_is_one_line_naming_the_offline_alternative(tmp_path):
    def not_logged_in():
        raise RuntimeError("No API key configured. Use `wandb login` to log in.")

    with pytest.raises(WandbUnavailable) as raised:
        load_wandb("team/pegrid", None, tmp_path, api_factory=not_logged_in)
    message = str(raised.value)
    assert "\n" not in message and "--runs" in message and "team/pegrid" in message and "No API key" in message
    assert not any(tmp_path.iterdir())  # nothing cached


def legend_texts(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def axis_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_loss_curves_facet_by_attention_with_seed_bands_and_status_marks(local):
    fig = figures.loss_curves(local.runs, local.history)
    axes = fig.axes
    assert len(axes) == 2  # training loss x (regular, flash)
    assert [ax.get_title() for ax in axes] == ["attention: regular", "attention: flash"]
    assert axes[0].get_xlabel() == "tokens seen" and axes[0].get_ylabel() == "training loss (nats)"
    regular_train, flash_train = axes
    # regular: rope (mean of 2 seeds + band), learned, the running rope copy (curve + status marker)
    assert len(regular_train.lines) == 4 and len(regular_train.collections) == 1
    assert "rope (running)" in axis_texts(regular_train) and "learned (failed)" in axis_texts(flash_train)
    texts = legend_texts(fig)
    assert {"rope", "learned", "attention: regular", "attention: flash", figures.BAND_TEXT} <= set(texts)
    assert {"failed (not finished)", "running (not finished)"} <= set(texts)
    assert figures.loss_curves(local.runs, local.history, "time/elapsed_s").axes[0].get_xlabel() == (
        "wall-clock time (s)")


def test_validation_curves_need_two_evaluations_per_run(local):
    # the fixture's runs are evaluated once, at the end (trainer.eval_every=0): no curve, one line why
    drawn = figures.validation_curves(local.runs, local.history)
    assert drawn.figure is None and len(drawn.notes) == 1
    assert drawn.notes[0].startswith("Validation-loss curves omitted") and "trainer.eval_every=0" in drawn.notes[0]

    # a second evaluation of one run: that run is drawn, the others are left out and counted
    rope = run_of(local.runs, "tiny/rope-regular-s2")["run_id"]
    history = local.history.copy()
    first = (history["run_id"] == rope) & (history["step"] == 1)
    history.loc[first, "val/loss"] = history.loc[(history["run_id"] == rope) & (history["step"] == 3),
                                                 "val/loss"].iloc[0] + 0.5
    drawn = figures.validation_curves(local.runs, history)
    [ax] = drawn.figure.axes  # only rope/regular's attention has a run to draw
    assert ax.get_title() == "attention: regular" and ax.get_ylabel() == "validation loss (nats)"
    [container] = ax.containers
    assert list(container.lines[0].get_xdata()) == [128, 3 * 128]
    assert drawn.notes == [f"Validation-loss curves: {len(local.runs) - 1} of {len(local.runs)} runs left out, "
                           "evaluated fewer than 2 times (trainer.eval_every=0: at the end only; set "
                           "trainer.eval_every to draw validation curves)"]


def test_efficiency_bars_show_every_combination_and_drop_the_empty_mfu_panel(local):
    drawn = figures.efficiency_bars(local.runs)
    tokens_ax, memory_ax = drawn.figure.axes  # no MFU panel: null for every CPU run
    assert drawn.notes == ["MFU (% of peak bf16) panel left out: null off-GPU (the runs trained on the CPU)"]
    assert len(tokens_ax.patches) == 3 and tokens_ax.get_ylabel() == "throughput (tokens/s)"
    labels = [t.get_text() for t in memory_ax.get_xticklabels()]
    assert labels == ["learned / regular", "learned / flash", "rope / regular"]
    assert len(memory_ax.patches) == 3 and memory_ax.get_ylabel() == "peak memory (MiB)"
    assert [p.get_facecolor()[:3] for p in tokens_ax.patches] == [
        matplotlib.colors.to_rgb(style.pe_color(pe)) for pe in ("learned", "learned", "rope")]
    assert {"rope", "learned", "attention: flash", figures.BAND_TEXT} <= set(legend_texts(drawn.figure))


def test_hellaswag_heatmap_has_na_for_missing_cells(local):
    fig = figures.hellaswag_heatmap(local.runs)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["learned", "rope"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["regular", "flash"]
    cells = axis_texts(ax)
    assert len(cells) == 4 and cells[3] == "n/a"  # rope x flash was not trained
    assert " ± " in cells[2]  # rope x regular: two seeds (95 % CI)
    assert fig.axes[1].get_ylabel() == "HellaSwag acc_norm (fraction)"


def test_extrapolation_marks_training_context_and_learned_limit_with_a_delta_row(local):
    fig = figures.extrapolation_curves(local.runs)
    loss_regular, loss_flash, delta_regular, delta_flash = fig.axes[:4]
    assert delta_regular.get_xlabel() == "evaluation context (tokens)"
    assert loss_regular.get_ylabel() == "validation loss (nats)" and delta_regular.get_ylabel() == "Δ loss vs 1× (nats)"
    assert [t.get_text() for t in delta_regular.get_xticklabels()] == ["32", "64", "128"]
    [top] = loss_regular.child_axes  # the ×L axis on top of the loss panels
    assert [t.get_text() for t in top.get_xticklabels()] == ["1×L", "2×L", "4×L"]
    for ax in (loss_regular, delta_regular):  # the training context L = 32 as a vertical line
        assert any(list(line.get_xdata()) == [32, 32] for line in ax.lines)

    def curves(ax):  # PE -> (context lengths relative to the first, has error bars); x is dodged a little
        return {c.get_label(): (list(np.round(c.lines[0].get_xdata() / c.lines[0].get_xdata()[0], 2)), c.has_yerr)
                for c in ax.containers}

    assert curves(loss_flash) == {"learned": ([1.0], False)}  # learned runs only at 1x; its failed seed not averaged
    assert curves(loss_regular) == {"learned": ([1.0], False), "rope": ([1.0, 2.0, 4.0], True)}  # rope: 2 seeds
    [rope] = [c for c in delta_regular.containers if c.get_label() == "rope"]
    assert rope.lines[0].get_ydata()[0] == 0.0  # Δ vs 1x starts at 0
    for ax in (loss_regular, delta_regular, loss_flash):  # learned's limit: a large X and a note
        assert "learned: cannot run past 1×" in axis_texts(ax)
        assert any(line.get_marker() == "X" and line.get_color() == style.pe_color("learned") for line in ax.lines)
    assert {"training context L", "last length the PE can run"} <= set(legend_texts(fig))


def test_saved_png_is_a_drawn_picture_of_the_figure_size(local, tmp_path):
    fig = figures.hellaswag_heatmap(local.runs)
    png, pdf = figures.save_figure(fig, tmp_path, "heatmap")
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 100 and image.shape[1] > 200 and image[..., :3].std() > 0.05
    assert pdf.read_bytes().startswith(b"%PDF")


def test_cli_writes_the_report_end_to_end(runs_root, tmp_path):
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "analysis.compare", "--runs", str(runs_root), "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 runs" in result.stdout
    report = (out / "report.md").read_text()
    drawn = {"loss_vs_tokens", "loss_vs_time", "efficiency", "hellaswag_acc_norm", "extrapolation", "loss_by_position",
             "attention_stats"}
    for stem in drawn:
        assert f"](figures/{stem}.png)" in report and f"](figures/{stem}.pdf)" in report
        assert (out / "figures" / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
    # one evaluation per run, and no PE with a bias: omitted, saying why
    assert set(FIGURE_TITLES) - drawn == {"val_loss_vs_tokens", "bias_by_distance"}
    assert not (out / "figures" / "val_loss_vs_tokens.png").exists()
    assert "*Validation-loss curves omitted: every run was evaluated fewer than 2 times" in report
    assert "*MFU (% of peak bf16) panel left out: null off-GPU" in report
    assert report.index("## Set-up") < report.index("## Results") < report.index("## Figures")
    assert "TrainingDiverged" in report and "1 finished, 1 failed" in report
    assert "> ⚠️ **n = 1 for 3 of 4 combinations**" in report  # only rope/regular in sweep tiny has 2 seeds

    csv = pd.read_csv(out / "final_metrics.csv")
    assert len(csv) == 4 and {"pe", "attention", "status", "n", "val/loss mean", "val/loss ci95"} <= set(csv.columns)
    assert len(pd.read_csv(out / "runs.csv")) == 6 and (out / "final_metrics.md").read_text().startswith("| sweep")
    for stem in ("table_loss", "table_efficiency"):  # each paper table as Markdown (in the report), LaTeX, CSV
        assert (out / f"{stem}.md").read_text() in report
        assert f"[{stem}.tex]({stem}.tex)" in report and f"[{stem}.csv]({stem}.csv)" in report
        frame = pd.read_csv(out / f"{stem}.csv")
        assert len(frame) == 4 and {"sweep", "pe", "attention", "n"} <= set(frame.columns)
        assert_booktabs(out / f"{stem}.tex", rows=4)
    loss = pd.read_csv(out / "table_loss.csv").set_index(["sweep", "pe", "attention"])
    assert loss.loc[("tiny", "learned", "flash"), "cannot run past"] == 1
    assert np.isnan(loss.loc[("tiny", "rope", "regular"), "cannot run past"])
    assert loss.loc[("tiny", "rope", "regular"), "extrapolation/delta_x2 n"] == 2
    efficiency = pd.read_csv(out / "table_efficiency.csv")
    assert "perf/mfu mean" not in efficiency and "perf/tokens_per_s ci95" in efficiency
    for png in (out / "figures").glob("*.png"):
        assert matplotlib.image.imread(png)[..., :3].std() > 0.05, png


def assert_booktabs(path, rows: int) -> None:
    """A booktabs table float whose every body row has as many columns as the header (\\multicolumn spans
    counted)."""
    tex = path.read_text()
    assert "\\begin{table}" in tex and "\\caption{" in tex and "\\label{tab:" in tex
    body = tex[tex.index("\\toprule"):tex.index("\\bottomrule")]
    assert tex.count("\\midrule") == 1 and "\\end{tabular}" in tex
    spec = re.search(r"\\begin\{tabular\}\{([lcr]+)\}", tex).group(1)
    lines = [line for line in body.splitlines() if line.endswith("\\\\")]
    assert len(lines) == 1 + rows
    for line in lines:
        spans = sum(int(n) - 1 for n in re.findall(r"\\multicolumn\{(\d+)\}", line))
        assert line.count(" & ") + 1 + spans == len(spec), line
    assert "_" not in tex.replace("\\_", "")  # underscores escaped


def test_cli_as_a_module_filters_one_sweep(runs_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "report"
    # runpy is what `python -m analysis.compare` runs (in this process: no second torch import)
    monkeypatch.delitem(sys.modules, "analysis.compare")  # imported above; runpy wants to run it afresh
    monkeypatch.setattr(sys, "argv", ["compare", "--runs", str(runs_root), "--group", "tiny", "--out", str(out)])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("analysis.compare", run_name="__main__")
    assert exited.value.code == 0 and "5 runs" in capsys.readouterr().out
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 5 and "rope-regular-s1" in set(runs["label"])  # its namesake in sweep "other" is left out


def test_cli_without_wandb_login_fails_in_one_line(tmp_path, monkeypatch, capsys):
    def not_logged_in():
        raise RuntimeError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(sources, "_default_api", not_logged_in)
    assert compare.main(["--wandb", "team/pegrid", "--cache", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: cannot read W&B project") and "--runs DIR" in error


def test_run_counts_read_as_english():
    assert [tables.n_runs(n) for n in (0, 1, 2)] == ["0 runs", "1 run", "2 runs"]
    assert tables.status_counts(pd.Series(["failed", "finished", "finished"])) == "2 finished, 1 failed"
