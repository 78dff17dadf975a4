"""The analysis tool (analysis/) on run records of real tiny training runs: tables, W&B loading and its
Parquet cache (against a fake with the public API's shape), figure content, and the CLI end to end."""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from analysis import compare, figures, sources, tables
from analysis.report import FIGURE_TITLES
from analysis.sources import WandbUnavailable, combine, load_local, load_wandb
from src.training.trainer import train
from tests.conftest import ROOT
from tests.train_helpers import compose_train, tiny_overrides

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
    assert rope["runs"] == 2 and rope["seeds"] == "1, 2" and rope["status"] == "2 finished"
    assert rope["val/loss mean"] == pytest.approx(seeds.mean()) and rope["val/loss std"] == pytest.approx(seeds.std())
    learned = table.loc[("tiny", "learned", "flash")]  # the failed seed is counted, not averaged
    assert learned["status"] == "1 finished, 1 failed" and learned["unfinished"] == ""
    assert np.isfinite(learned["val/loss mean"]) and np.isnan(learned["val/loss std"])
    assert table.loc[("other", "rope", "regular"), "unfinished"] == "running"

    markdown = tables.combination_markdown(tables.combination_table(local.runs), local.runs)
    assert "validation loss (nats)" in markdown and " ± " in markdown and "n/a" in markdown
    assert markdown.count("\n") == 2 + len(table)


class FakeRun:
    """What wandb.Api().runs() yields, built from a local run record as the trainer's W&B logger logs it."""

    def __init__(self, run_dir, run_id):
        summary = json.loads((run_dir / "summary.json").read_text())
        self.id, self.name, self.group = run_id, summary["run_name"], summary.get("sweep")
        self.config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
        self.tags = [f"pe:{summary['pe']}", f"attention:{summary['attention']}", f"sweep:{self.group}"]
        self.state = {"running": "running", "failed": "crashed"}.get(summary["status"], "finished")
        self.summary = {**{k: v for k, v in summary.items() if v is not None}, "_runtime": 12.5}
        self._rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    def scan_history(self):
        for i, row in enumerate(self._rows):
            yield {"trainer/step": row["step"], "_step": i, "_runtime": 1.0,
                   **{k: v for k, v in row.items() if k != "step" and v is not None}}


class FakeApi:
    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return [r for r in self._runs if not filters or r.group == filters["group"]]


def test_wandb_runs_load_like_local_ones_and_are_cached(runs_root, local, tmp_path):
    fake = FakeApi([FakeRun(d, f"id{i}") for i, d in enumerate(sorted((runs_root / "tiny").iterdir()))])
    loaded = load_wandb("team/pegrid", "tiny", tmp_path, api_factory=lambda: fake)
    assert fake.calls == [("team/pegrid", {"group": "tiny"})]
    runs = loaded.runs.set_index("name").sort_index()
    expected = local.runs[local.runs["sweep"] == "tiny"].set_index("name").sort_index()
    for column in ["pe", "attention", "seed", "sweep", "status", "val/loss", "hellaswag/acc_norm", "tokens",
                   "extrapolation/loss_x2", "perf/tokens_per_s"]:
        pd.testing.assert_series_equal(runs[column], expected[column], check_names=False)
    assert set(loaded.runs["run_id"]) == {f"team/pegrid/id{i}" for i in range(5)}
    history = loaded.history[loaded.history["run_id"] == "team/pegrid/id0"]
    assert list(history["step"]) == [1, 2, 3] and "_runtime" not in loaded.history

    def unreachable():
        raise AssertionError("the cache should have answered")

    cached = load_wandb("team/pegrid", "tiny", tmp_path, api_factory=unreachable)
    pd.testing.assert_frame_equal(cached.runs, loaded.runs)
    pd.testing.assert_frame_equal(cached.history, loaded.history)
    load_wandb("team/pegrid", "tiny", tmp_path, refresh=True, api_factory=lambda: fake)
    assert len(fake.calls) == 2


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
    assert len(axes) == 4  # (training, validation) x (regular, flash)
    assert [ax.get_title() for ax in axes[:2]] == ["attention: regular", "attention: flash"]
    assert axes[0].get_xlabel() == "tokens seen" and axes[0].get_ylabel() == "training loss (nats)"
    assert axes[2].get_ylabel() == "validation loss (nats)"
    regular_train, flash_train = axes[0], axes[1]
    # regular: rope (mean of 2 seeds + band), learned, the running rope copy (curve + status marker)
    assert len(regular_train.lines) == 4 and len(regular_train.collections) == 1
    assert "rope (running)" in axis_texts(regular_train) and "learned (failed)" in axis_texts(flash_train)
    texts = legend_texts(fig)
    assert {"rope", "learned", "attention: regular", "attention: flash", "± std over seeds"} <= set(texts)
    assert {"failed (not finished)", "running (not finished)"} <= set(texts)
    assert figures.loss_curves(local.runs, local.history, "time/elapsed_s").axes[0].get_xlabel() == (
        "wall-clock time (s)")


def test_bar_charts_show_every_combination_and_na_mfu(local):
    fig = figures.throughput_bars(local.runs)
    tokens_ax, mfu_ax = fig.axes
    assert len(tokens_ax.patches) == 3 and tokens_ax.get_ylabel() == "throughput (tokens/s)"
    labels = [t.get_text() for t in tokens_ax.get_xticklabels()]
    assert labels == ["learned / regular", "learned / flash", "rope / regular"]
    assert len(mfu_ax.patches) == 0 and any("n/a" in t for t in axis_texts(mfu_ax))  # CPU: MFU is null
    assert {"rope", "learned", "attention: flash"} <= set(legend_texts(fig))
    memory = figures.memory_bars(local.runs).axes[0]
    assert len(memory.patches) == 3 and memory.get_ylabel() == "peak memory (MiB)"


def test_hellaswag_heatmap_has_na_for_missing_cells(local):
    fig = figures.hellaswag_heatmap(local.runs)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["learned", "rope"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["regular", "flash"]
    cells = axis_texts(ax)
    assert len(cells) == 4 and cells[3] == "n/a"  # rope x flash was not trained
    assert " ± " in cells[2]  # rope x regular: two seeds
    assert fig.axes[1].get_ylabel() == "HellaSwag acc_norm (fraction)"


def test_extrapolation_skips_lengths_a_pe_cannot_run(local):
    fig = figures.extrapolation_curves(local.runs)
    regular, flash = fig.axes
    assert regular.get_xlabel() == "evaluation context length (tokens)"
    assert regular.get_ylabel() == "validation loss (nats)"

    def curves(ax):  # PE -> (context lengths, has error bars)
        return {c.get_label(): (list(c.lines[0].get_xdata()), c.has_yerr) for c in ax.containers}

    assert curves(flash) == {"learned": ([32], False)}  # learned runs only at 1x; its failed seed is not averaged
    assert curves(regular) == {"learned": ([32], False), "rope": ([32, 64, 128], True)}  # rope: 2 seeds


def test_saved_png_is_a_drawn_picture_of_the_figure_size(local, tmp_path):
    fig = figures.hellaswag_heatmap(local.runs)
    png, pdf = figures.save_figure(fig, tmp_path, "heatmap")
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 100 and image.shape[1] > 200 and image[..., :3].std() > 0.05
    assert pdf.read_bytes().startswith(b"%PDF")


def test_cli_writes_the_report_end_to_end(runs_root, tmp_path):
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "analysis/compare.py", "--runs", str(runs_root), "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 runs" in result.stdout
    report = (out / "report.md").read_text()
    for stem in FIGURE_TITLES:
        assert f"](figures/{stem}.png)" in report and f"](figures/{stem}.pdf)" in report
        assert (out / "figures" / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
    assert "TrainingDiverged" in report and "1 finished, 1 failed" in report
    csv = pd.read_csv(out / "final_metrics.csv")
    assert len(csv) == 4 and {"pe", "attention", "status", "val/loss mean", "val/loss std"} <= set(csv.columns)
    assert len(pd.read_csv(out / "runs.csv")) == 6 and (out / "final_metrics.md").read_text().startswith("| sweep")
    for png in (out / "figures").glob("*.png"):
        assert matplotlib.image.imread(png)[..., :3].std() > 0.05, png


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
