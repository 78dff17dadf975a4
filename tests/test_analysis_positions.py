"""The analysis of what the evaluator records beyond single numbers, on synthetic run records (no training):
eval_details.json (loss by position, bias by distance, attention statistics; analysis/positions.py),
inference-time variant records (`<run>/variants/<name>/`) and the sliding-window losses."""

from __future__ import annotations

import json
import warnings
import zlib

import matplotlib.colors
import numpy as np
import pandas as pd
import pytest
import yaml

from analysis import figures, positions, style, tables
from analysis.report import FIGURE_HINTS, FIGURE_TITLES, write_report
from analysis.sources import Tables, combine, is_variant, load_local
from src import metrics as run_metrics
from src.run_record import DETAILS_FILE, VARIANTS_DIR

L = 64
N_LAYER, N_HEAD = 2, 4
MULTIPLIERS = [1, 2, 4, 8]
STRIDE = 32
BIAS_PES = {"alibi", "kerple"}
# (pe, attention, seed); rope/regular has two seeds and a YaRN variant; learned runs only at 1x
RUNS = [("learned", "regular", 1), ("rope", "regular", 1), ("rope", "regular", 2), ("alibi", "regular", 1),
        ("alibi", "regular", 2), ("alibi", "flash", 1), ("kerple", "flash", 1), ("nope", "flash", 1)]


def seeded(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def max_multiplier(pe: str) -> int:
    return 1 if pe == "learned" else MULTIPLIERS[-1]


def position_losses(pe: str, seed: int, m: int) -> tuple[list[float], list[int]]:
    """A known loss per position (falling with context, rising past L for rope) and uneven counts."""
    rng = seeded(pe, seed, m)
    p = np.arange(m * L)
    loss = 6.0 - 0.4 * np.log1p(p) + (0.002 * np.maximum(p - L, 0) if pe == "rope" else 0) + rng.normal(0, 0.3, p.size)
    count = rng.integers(1, 9, p.size)
    return [float(v) for v in loss], [int(v) for v in count]


def bias_heads(pe: str, seed: int, layer: int) -> list[list[float]]:
    distance = np.arange(4 * L)
    if pe == "alibi":
        return [list(-(2.0 ** -(h + 1)) * (1 + 0.1 * layer) * distance) for h in range(N_HEAD)]
    return [list(-(h + 1) * (0.5 + 0.3 * layer) * np.log1p((0.1 + 0.05 * seed) * distance)) for h in range(N_HEAD)]


def attention_entry(pe: str, seed: int, m: int) -> dict:
    rng = seeded(pe, seed, m, "attention")
    return {"context": m * L, "windows": 2,
            "entropy": rng.uniform(0.5, np.log(m * L), (N_LAYER, N_HEAD)).tolist(),
            "mean_distance": rng.uniform(1.0, m * L / 2, (N_LAYER, N_HEAD)).tolist()}


def details_of(pe: str, seed: int, variant: str | None = None) -> dict:
    top = max_multiplier(pe)
    lbp = {}
    for m in (1, top):
        loss, count = position_losses(pe + (variant or ""), seed, m)
        lbp[str(m)] = {"context": m * L, "loss": loss, "count": count}
    bias = None
    if pe in BIAS_PES:
        bias = {"query_position": 4 * L - 1, "distance": list(range(4 * L)),
                "layers": {str(layer): bias_heads(pe, seed, layer) for layer in (0, N_LAYER - 1)}}
    attention = {str(m): attention_entry(pe + (variant or ""), seed, m) for m in sorted({1, min(4, top)})}
    return {"block_size": L, "loss_by_position": lbp, "bias_by_distance": bias, "attention": attention}


def write_record(run_dir, pe, attention, seed, *, sliding=True, stride=STRIDE, details=True, variant=None,
                 sweep="syn"):
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"{pe}-{attention}-s{seed}"
    config = {"run_name": name, "sweep_name": sweep,
              "model": {"pe": {"name": pe}, "attention": {"name": attention}, "block_size": L, "n_layer": N_LAYER,
                        "n_head": N_HEAD, "n_embd": 32, "vocab_size": 97},
              "trainer": {"seed": seed, "max_steps": 4, "eval_every": 0, "total_batch_tokens": 256},
              "eval": {"extrapolation": {"num_tokens": 4096}}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    rng = np.random.default_rng(seed)
    summary = {"run_name": name, "pe": pe, "attention": attention, "seed": seed, "sweep": sweep,
               "status": "finished", "val/loss": 4.0 + rng.uniform(0, 0.1)}
    for m in MULTIPLIERS:
        summary[run_metrics.extrapolation_context_key(m)] = m * L
        ran = m <= max_multiplier(pe)
        summary[run_metrics.extrapolation_loss_key(m)] = 4.0 + 0.05 * m + rng.uniform(0, 0.05) if ran else None
        if sliding:
            summary[run_metrics.sliding_loss_key(m)] = 3.9 + 0.04 * m + rng.uniform(0, 0.05) if ran else None
    if sliding:
        summary[run_metrics.EXTRAPOLATION_STRIDE] = stride
    if variant:
        summary[run_metrics.PE_VARIANT] = variant
    else:
        summary |= {"step": 4, "tokens": 1024, "num_params": 1000, "perf/tokens_per_s": 1e4 + seed,
                    "perf/peak_mem_mb": 100.0, "time/elapsed_s": 2.0, "train/loss": 4.2, "device": "cpu"}
        rows = [{"step": s, "tokens": 256 * s, "train/loss": 5.0 - 0.2 * s, "time/elapsed_s": 0.5 * s}
                for s in range(1, 5)]
        if (pe, attention, seed) == ("rope", "regular", 1):  # evaluated twice: a validation curve
            rows += [{"step": 2, "val/loss": 4.5}, {"step": 4, "val/loss": summary["val/loss"]}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if details:
        (run_dir / DETAILS_FILE).write_text(json.dumps(details_of(pe, seed, variant)))
    return run_dir


def write_study(root, **kwargs):
    for pe, attention, seed in RUNS:
        run_dir = write_record(root / f"{pe}-{attention}-s{seed}", pe, attention, seed, **kwargs)
        if (pe, attention, seed) == ("rope", "regular", 1):
            write_record(run_dir / VARIANTS_DIR / "yarn×4", pe, attention, seed, variant="yarn×4", **kwargs)
    return root


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return combine([load_local([write_study(tmp_path_factory.mktemp("syn"))])])


def run_of(runs: pd.DataFrame, pe: str, attention: str, seed: int) -> dict:
    [row] = runs[(runs["pe"] == pe) & (runs["attention"] == attention) & (runs["seed"] == seed)].to_dict("records")
    return row


def legend_texts(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def panel(fig, title: str):
    [ax] = [ax for ax in fig.axes if ax.get_title().startswith(title)]
    return ax


def curve(ax, label: str):
    [line] = [line for line in ax.lines if line.get_label() == label]
    return line


# ------------------------------------------------------------------------------------- loading


def test_variant_record_is_a_pe_of_its_own_with_a_readable_label(study):
    runs = study.runs
    assert len(runs) == len(RUNS) + 1 and runs["label"].is_unique
    variant = run_of(runs, "rope+yarn×4", "regular", 1)
    assert variant["name"] == "rope-regular-s1 [yarn×4]" and variant["label"] == "rope-regular-s1 [yarn×4]"
    assert variant["run_id"].endswith("rope-regular-s1/variants/yarn×4") and variant["status"] == "finished"
    assert np.isfinite(variant[run_metrics.extrapolation_loss_key(8)]) and "pe_variant" not in runs
    assert list(is_variant(runs["pe"])).count(True) == 1
    assert variant["run_id"] not in set(study.history["run_id"])  # no training history
    # the trained run is unchanged
    assert run_of(runs, "rope", "regular", 1)["name"] == "rope-regular-s1"


def test_details_are_loaded_per_run_and_filtered_with_the_runs(study, tmp_path):
    assert set(study.details) == set(study.runs["run_id"])
    variant = run_of(study.runs, "rope+yarn×4", "regular", 1)["run_id"]
    assert study.details[variant]["block_size"] == L
    alibi = run_of(study.runs, "alibi", "regular", 1)["run_id"]
    assert len(study.details[alibi]["bias_by_distance"]["layers"]["1"]) == N_HEAD
    # combine keeps the details of the runs it keeps
    root = tmp_path / "two"
    write_record(root / "a", "rope", "regular", 1, sweep="one")
    write_record(root / "b", "alibi", "regular", 1, sweep="two")
    one = combine([load_local([root])], sweep="one")
    assert list(one.details) == list(one.runs["run_id"]) and len(one.details) == 1


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "\xff\xfe"])
def test_corrupt_details_are_skipped_with_a_warning(tmp_path, content):
    run_dir = write_record(tmp_path / "run", "rope", "regular", 1)
    (run_dir / DETAILS_FILE).write_bytes(content.encode("latin-1"))
    with pytest.warns(UserWarning, match=DETAILS_FILE):
        loaded = load_local([tmp_path])
    assert len(loaded.runs) == 1 and loaded.details == {}


def test_style_orders_variants_after_their_base_in_a_shade_of_its_colour():
    names = ["rope+yarn×16", "nope", "rope", "learned", "rope+yarn×4", "zeta+x", "zeta", "rope+ntk×4"]
    assert style.ordered(names, style.PE_ORDER) == ["learned", "rope", "rope+ntk×4", "rope+yarn×4", "rope+yarn×16",
                                                    "nope", "zeta", "zeta+x"]
    assert sorted([("rope+yarn×4", "regular"), ("alibi", "regular"), ("rope", "flash")],
                  key=lambda c: style.order_key(*c)) == [("rope", "flash"), ("rope+yarn×4", "regular"),
                                                          ("alibi", "regular")]
    variants = ["rope+yarn×2", "rope+yarn×4", "rope+yarn×8", "rope+yarn×16", "rope+ntk×4", "rope+linear×4"]
    colours = [style.pe_color(v) for v in variants]
    assert len(set(colours)) == len(colours) and style.pe_color("rope") not in colours
    assert colours == [style.pe_color(v) for v in variants]  # a pure function of the name
    others = {style.pe_color(pe) for pe in style.KNOWN_PE_ORDER}
    assert not set(colours) & others
    rope_hue = matplotlib.colors.rgb_to_hsv(matplotlib.colors.to_rgb(style.pe_color("rope")))[0]
    for colour in colours:  # a shade of rope's green, not another hue
        assert matplotlib.colors.rgb_to_hsv(matplotlib.colors.to_rgb(colour))[0] == pytest.approx(rope_hue, abs=0.02)
    for name in ("zeta+foo", "nope+yarn×4", "rope+", "rope+×", "rope+base=500000"):  # never a KeyError
        assert style.pe_color(name) and style.pe_color(name) == style.pe_color(name)
    assert style.pe_color("nope+yarn×4") != style.pe_color("nope")


# ------------------------------------------------------------------------------------- loss by position


def test_loss_by_position_is_the_count_weighted_bin_mean_of_the_longest_window(study):
    drawn = positions.loss_by_position(study.runs, study.details)
    fig, width = drawn.figure, L // 8
    assert f"(bins of {width} positions, mean of up to 2 seeds)" in fig.get_suptitle()
    one_run = study.runs[(study.runs["pe"] == "rope") & (study.runs["seed"] == 1)].head(1)
    for draw in (positions.loss_by_position, positions.attention_stats):  # one run is not called a mean
        title = draw(one_run, study.details).figure.get_suptitle()
        assert "one seed" in title and "mean of" not in title, title
    regular = panel(fig, "attention: regular")
    # rope/regular: two seeds, 8L positions, each seed binned by count, then the seed mean
    expected = []
    for seed in (1, 2):
        loss, count = position_losses("rope", seed, 8)
        loss, count = np.array(loss).reshape(-1, width), np.array(count).reshape(-1, width)
        expected.append((loss * count).sum(axis=1) / count.sum(axis=1))
    rope = curve(regular, "rope")
    np.testing.assert_allclose(rope.get_ydata(), np.mean(expected, axis=0))
    x = rope.get_xdata()
    assert len(x) == 8 * L // width and x[0] == (width - 1) / 2 and x[-1] < 8 * L
    learned = curve(regular, "learned")  # it cannot run past L: its curve stops there
    assert learned.get_xdata().max() < L and len(learned.get_xdata()) == 8
    variant = curve(regular, "rope+yarn×4")
    assert matplotlib.colors.same_color(variant.get_color(), style.pe_color("rope+yarn×4"))
    assert any(list(line.get_xdata()) == [L, L] for line in regular.lines)  # the training context
    assert "training context L" in legend_texts(fig)
    assert [ax.get_title() for ax in fig.axes] == ["attention: regular", "attention: flash"]


def test_binning_handles_a_short_last_bin_zero_counts_and_nulls():
    x, y = positions.binned_loss([1.0, 3.0, None, 5.0, 7.0], [1, 3, 2, 0, 2], width=2)
    np.testing.assert_allclose(x, [0.5, 2.5, 4.0])
    np.testing.assert_allclose(y, [(1 + 9) / 4, np.nan, 7.0])  # null loss and zero count do not count
    x, y = positions.binned_loss([2.0, 4.0], None, width=1)
    np.testing.assert_allclose(y, [2.0, 4.0])
    assert positions.bin_width(4) == 1 and positions.bin_width(64) == 8


# ------------------------------------------------------------------------------------- bias by distance


def bias_lines(ax):
    return [line for line in ax.lines if line.get_label().startswith("layer ")]


def test_bias_figure_has_a_line_per_head_and_layer_for_bias_pes_only(study):
    drawn = positions.bias_by_distance(study.runs, study.details)
    fig = drawn.figure
    titles = [ax.get_title() for ax in fig.axes]
    # rows: the PEs with a bias, columns: the attentions
    assert titles == ["alibi / attention: regular (seed 1)", "alibi / attention: flash (seed 1)", "",
                      "kerple / attention: flash (seed 1)"]
    alibi = panel(fig, "alibi / attention: regular")
    lines = bias_lines(alibi)
    assert len(lines) == N_HEAD * 2
    assert [line.get_linestyle() for line in lines] == ["-"] * N_HEAD + ["--"] * N_HEAD
    # the first seed's biases, not a mean over seeds
    first = bias_heads("alibi", 1, N_LAYER - 1)
    for head, line in enumerate(lines[N_HEAD:]):
        np.testing.assert_allclose(line.get_ydata(), first[head])
        assert list(line.get_xdata()) == list(range(4 * L))
    assert len({line.get_color() for line in lines[:N_HEAD]}) == N_HEAD  # heads told apart
    assert any(list(line.get_xdata()) == [L, L] for line in alibi.lines)
    assert "n/a" in [t.get_text() for t in fig.axes[2].texts]  # kerple/regular was not trained
    assert not any(title.startswith(("rope", "learned", "nope")) for title in titles)
    assert drawn.notes[0].startswith("Bias by distance: each panel is the first seed's run (seed 1)")
    assert "not drawn: learned, nope, rope, rope+yarn×4" in drawn.notes[1]
    assert {"first layer (0)", f"last layer ({N_LAYER - 1})", "head 0 (light)"} <= set(legend_texts(fig))


def test_bias_figure_is_omitted_without_bias_pes(study):
    runs = study.runs[~study.runs["pe"].isin(BIAS_PES)]
    drawn = positions.bias_by_distance(runs, study.details)
    assert drawn.figure is None and drawn.notes[0].startswith("Bias-by-distance figure omitted")


# ------------------------------------------------------------------------------------- attention statistics


def test_attention_stats_are_head_means_averaged_over_seeds(study):
    fig = positions.attention_stats(study.runs, study.details).figure
    entropy_regular, entropy_flash, distance_regular, distance_flash = fig.axes
    assert entropy_regular.get_title() == "attention: regular" and distance_regular.get_xlabel() == "layer"
    assert entropy_regular.get_ylabel() == "attention entropy (nats)"
    for ax, stat in ((entropy_regular, "entropy"), (distance_regular, "mean_distance")):
        for m in (1, 4):
            expected = np.mean([np.mean(attention_entry("rope", seed, m)[stat], axis=1) for seed in (1, 2)], axis=0)
            line = curve(ax, f"rope {m}×")
            np.testing.assert_allclose(line.get_ydata(), expected)
            assert list(line.get_xdata()) == list(range(N_LAYER))
            assert (line.get_linestyle(), line.get_marker()) == (("-", "o") if m == 1 else ("--", "s"))
    assert [line.get_label() for line in entropy_regular.lines if line.get_label().startswith("learned")] == [
        "learned 1×"]  # learned has no 4x window
    assert {"1× context (64 tokens)", "4× context (256 tokens)"} <= set(legend_texts(fig))


# ------------------------------------------------------------------------------------- sliding-window losses


def sliding_keys() -> list[str]:
    return [run_metrics.sliding_loss_key(m) for m in MULTIPLIERS]


def test_loss_table_has_sliding_columns_only_when_present(study, tmp_path):
    table = tables.loss_table(study.runs)
    assert [c for c in table.columns if run_metrics.is_sliding_loss(c)] == sliding_keys()
    markdown = tables.paper_markdown(table)
    header = markdown.splitlines()[0]
    assert "| sliding 1× | sliding 2× | sliding 4× | sliding 8× |" in header and "Δ 8×" in header
    assert f"moved by S = {STRIDE} tokens" in table.caption and "non-overlapping" in table.caption
    assert "sliding 8$\\times$" in tables.paper_latex(table)
    def cells(line):
        return [c.strip() for c in line.strip().strip("|").split(" | ")]

    rows = {(r[0], r[1]): r for r in map(cells, markdown.splitlines()[2:])}
    assert rows[("learned", "regular")][cells(header).index("sliding 2×")] == "cannot run past 1×"
    assert list(rows)[:4] == [("learned", "regular"), ("rope", "regular"), ("rope+yarn×4", "regular"),
                              ("alibi", "regular")]  # the variant right after its base

    # strides that differ: in each header
    mixed = study.runs.copy()
    mixed.loc[mixed["pe"] == "alibi", run_metrics.EXTRAPOLATION_STRIDE] = 16
    header = tables.paper_markdown(tables.loss_table(mixed)).splitlines()[0]
    assert "sliding 4× (stride 16/32)" in header

    # no sliding-window evaluation: no such column, no word of it
    plain = combine([load_local([write_study(tmp_path / "plain", sliding=False)])])
    table = tables.loss_table(plain.runs)
    assert not any(run_metrics.is_sliding_loss(c) for c in table.columns)
    assert "sliding" not in tables.paper_markdown(table) + table.caption + " ".join(table.dropped)


def test_extrapolation_figure_gets_a_sliding_row_only_when_present(study, tmp_path):
    fig = figures.extrapolation_curves(study.runs)
    assert len(fig.axes) == 3 * 2  # rows loss, sliding, Δ x 2 attentions (the ×L axis on top is a child)
    loss_ax, _, sliding_ax, _, delta_ax, _ = fig.axes
    assert sliding_ax.get_ylabel() == f"sliding-window loss (nats)\n(stride {STRIDE})"
    assert "non-overlapping" in loss_ax.get_ylabel() and delta_ax.get_ylabel().startswith("Δ loss vs 1×")
    labels = {c.get_label() for c in sliding_ax.containers}
    assert {"learned", "rope", "rope+yarn×4", "alibi"} <= labels
    [rope] = [c for c in sliding_ax.containers if c.get_label() == "rope"]
    runs = study.runs[study.runs["pe"] == "rope"]
    np.testing.assert_allclose(rope.lines[0].get_ydata(), [runs[k].mean() for k in sliding_keys()])

    plain = combine([load_local([write_study(tmp_path / "plain", sliding=False)])])
    fig = figures.extrapolation_curves(plain.runs)
    assert len(fig.axes) == 2 * 2 and fig.axes[0].get_ylabel() == "validation loss (nats)"


# ------------------------------------------------------------------------------------- training figures, report


def test_training_figures_lack_variants_without_a_word(study):
    fig = figures.loss_curves(study.runs, study.history)
    assert "rope+yarn×4" not in legend_texts(fig) and "rope" in legend_texts(fig)
    drawn = figures.validation_curves(study.runs, study.history)
    assert drawn.notes[0].startswith(f"Validation-loss curves: {len(RUNS) - 1} of {len(RUNS)} runs left out")
    assert "rope+yarn×4" not in legend_texts(drawn.figure)
    efficiency = figures.efficiency_bars(study.runs)
    ticks = [t.get_text() for t in efficiency.figure.axes[-1].get_xticklabels()]
    assert not any("yarn" in t for t in ticks) and "rope / regular" in ticks
    table = tables.efficiency_table(study.runs)
    assert "rope+yarn×4" not in set(table.frame["pe"]) and "variants (rope+yarn×4) are left out" in table.caption


def test_report_draws_the_detail_figures_and_omits_them_saying_why(study, tmp_path):
    out = tmp_path / "report"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about variants without a history, nothing else
        report = write_report(study, out, ["synthetic"]).read_text()
    stems = ["loss_by_position", "bias_by_distance", "attention_stats"]
    for stem in stems:
        assert f"### {FIGURE_TITLES[stem]}" in report and f"](figures/{stem}.png)" in report
        assert FIGURE_HINTS[stem] in report
        assert (out / "figures" / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
    order = [report.index(f"](figures/{stem}.png)") for stem in ["extrapolation", *stems]]
    assert order == sorted(order)  # after the extrapolation figure
    assert "1 of them an inference-time variant record" in report and "rope+yarn×4" in report
    assert "sliding 8×" in report

    bare = tmp_path / "bare"
    report = write_report(Tables(study.runs, study.history), bare, ["synthetic"]).read_text()
    for stem in stems:
        assert f"](figures/{stem}.png)" not in report and not (bare / "figures" / f"{stem}.png").exists()
    assert "*Loss-by-position figure omitted: no run has an eval_details.json" in report
    assert "*Bias-by-distance figure omitted:" in report and "*Attention-statistics figure omitted:" in report


def test_report_survives_partial_and_malformed_details(study, tmp_path):
    details = dict(study.details)
    ids = list(details)
    details[ids[0]] = {"block_size": L, "loss_by_position": None, "attention": {"1": {"entropy": "x"}}}
    details[ids[1]] = {"loss_by_position": {"8": {"loss": [], "count": []}}, "bias_by_distance": {"distance": 3}}
    details[ids[2]] = {}
    report = write_report(Tables(study.runs, study.history, details), tmp_path / "r", ["synthetic"]).read_text()
    assert "](figures/loss_by_position.png)" in report and "left out (no loss_by_position" in report
