"""The comparison figures. Each function takes the tidy tables and returns a matplotlib Figure (so tests can
inspect what was drawn); `all_figures` says, per figure, either the Figure or why it was left out, and what
it left out (a panel with nothing to draw, runs evaluated once); `save_figure` writes PNG (screens) and PDF
(papers).

Conventions shared by every figure: colour and order = PE, line style / hatch / marker = attention
(analysis/style.py, also used by the benchmark's bench.png); several seeds of a combination are drawn as
their mean with a 95 % CI band or error bar (Student's t, as in the tables); a combination with no finished
run is drawn faded and marked with its status ("(failed)", "(running)"); a missing value is written "n/a"
rather than drawn as zero, and a panel that would hold nothing at all is not drawn. Figures pool sweeps:
select one with `--group`. An inference-time variant (`rope+yarn×4`) is a PE of its own, in a shade of its
base PE's colour; it has no training history, so the training figures (loss curves, throughput) lack it.
The figures read from eval_details.json (loss by position, bias by distance, attention statistics) are in
analysis/positions.py.

Figures are built with the object API (`Figure()`, no pyplot): no global backend or figure registry, so
nothing needs a display and nothing leaks; saving renders with Agg (PNG) and the PDF backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import EngFormatter

from analysis import metrics
from analysis.sources import is_variant
from analysis.stats import t_quantile
from analysis.style import (
    ATTENTION_ORDER,
    PE_ORDER,
    STATUS_MARKERS,
    attention_hatch,
    attention_linestyle,
    attention_marker,
    ordered,
    pe_color,
)
from analysis.tables import (
    LIMIT,
    cannot_run_text,
    combination_table,
    na_reason,
    stride_text,
    table_metrics,
    with_deltas,
)
from src import metrics as run_metrics
from src.metrics import HELLASWAG_ACC_NORM, extrapolation_context_key, extrapolation_loss_key, sliding_loss_key

FORMATS = ("png", "pdf")
DPI = 150
UNFINISHED_ALPHA = 0.45
NA_TEXT = "n/a"
BAND_TEXT = "95 % CI over seeds (t)"
BAND_ALPHA = 0.12  # light: with few seeds the t interval is wide and must not hide the other curves
MIN_EVALUATIONS = 2  # a validation curve needs at least two points to be a curve
DODGE_OCTAVES = 0.025  # x offset between neighbouring PEs' error bars in the extrapolation figure
LIMIT_MARKER = dict(marker="X", markersize=13, markeredgecolor="black", markeredgewidth=1.0, linestyle="none",
                    zorder=5)


@dataclass
class Drawn:
    """A figure of the report, or None with the reason in `notes[0]`; notes: one line per thing left out."""

    figure: Figure | None
    notes: list[str] = field(default_factory=list)


def save_figure(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """stem.png and stem.pdf in out_dir; bbox 'tight' keeps the outside legend in the picture."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.{fmt}" for fmt in FORMATS]
    for path in paths:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return paths


def _combinations(runs: pd.DataFrame) -> pd.DataFrame:
    """Per PE x attention (sweeps pooled): mean / CI of each metric (context lengths and Δ vs 1x included)
    and the `unfinished` status."""
    runs = with_deltas(runs)
    multipliers = run_metrics.extrapolation_multipliers(runs.columns)
    extra = [extrapolation_context_key(m) for m in multipliers if extrapolation_context_key(m) in runs]
    extra += [key for m in multipliers if (key := run_metrics.extrapolation_delta_key(m)) in runs]
    return combination_table(runs.assign(sweep="all"), table_metrics(runs) + extra)


def _pes_and_attentions(runs: pd.DataFrame) -> tuple[list[str], list[str]]:
    return ordered(runs["pe"], PE_ORDER), ordered(runs["attention"], ATTENTION_ORDER)


def trained_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that trained (inference-time variants left out: they have no training history or cost), or
    all of them when there are only variants."""
    trained = runs[~is_variant(runs["pe"])]
    return trained if len(trained) else runs


def _legend(fig: Figure, pes: list[str], attentions: list[str], style: str, statuses: set[str] = frozenset(),
            ci: str | None = None, extra: list = ()) -> None:
    """One legend for the whole figure, outside the axes on the right: PE colours, attention styles, the
    status markers used, what the CI (`ci`: "band" or "bars", None when no combination has one) means, and
    any figure-specific entries."""
    if style == "bar":
        handles = [Patch(facecolor=pe_color(pe), edgecolor="black", label=pe) for pe in pes]
        handles += [Patch(facecolor="white", edgecolor="black", hatch=attention_hatch(a), label=f"attention: {a}")
                    for a in attentions]
    else:
        handles = [Line2D([], [], color=pe_color(pe), linewidth=2, label=pe) for pe in pes]
        handles += [Line2D([], [], color="grey", linestyle=attention_linestyle(a), marker=attention_marker(a),
                           label=f"attention: {a}") for a in attentions]
    handles += [Line2D([], [], color="grey", linestyle="none", marker=STATUS_MARKERS[s], markersize=8,
                       label=f"{s} (not finished)") for s in sorted(statuses)]
    if ci == "band":
        handles.append(Patch(facecolor="grey", alpha=BAND_ALPHA, label=BAND_TEXT))
    elif ci == "bars":
        handles.append(Line2D([], [], color="black", marker="|", markersize=12, linestyle="none", label=BAND_TEXT))
    handles += list(extra)
    fig.legend(handles=handles, loc="outside right upper", title="PE (colour) / attention (style)",
               fontsize="small")


# ------------------------------------------------------------------------------------- loss curves


def _seed_mean(history: pd.DataFrame, run_ids: list[str], x: str, metric: str) -> pd.DataFrame:
    """Mean and 95 % CI half-width over seeds at each step (x averaged too: seeds' wall-clock times differ)."""
    rows = history[history["run_id"].isin(run_ids)].dropna(subset=[x, metric])
    grouped = rows.groupby("step")
    curve = pd.DataFrame({"x": grouped[x].mean(), "mean": grouped[metric].mean(), "std": grouped[metric].std(),
                          "n": grouped[metric].size()}).reset_index()
    t = curve["n"].map(lambda n: t_quantile(n - 1) if n > 1 else np.nan)
    return curve.assign(ci=t * curve["std"] / np.sqrt(curve["n"]))


def evaluation_counts(runs: pd.DataFrame, history: pd.DataFrame, metric: str = run_metrics.VAL_LOSS) -> pd.Series:
    """How many logged values of `metric` each run has (run_id -> count)."""
    logged = history.dropna(subset=[metric]) if metric in history else history.iloc[:0]
    return logged.groupby("run_id").size().reindex(runs["run_id"], fill_value=0)


def loss_curves(runs: pd.DataFrame, history: pd.DataFrame, x: str = run_metrics.TOKENS,
                metric: str = run_metrics.TRAIN_LOSS) -> Figure:
    """`metric` (training or validation loss) against tokens or wall-clock time, one panel per attention
    mechanism, one curve per PE (finished seeds as one mean curve with its CI band). Inference-time variants
    have no history and are not drawn (nor listed)."""
    runs = trained_runs(runs)
    pes, attentions = _pes_and_attentions(runs)
    sparse = metric != run_metrics.TRAIN_LOSS  # evaluations are few: points with error bars
    fig = Figure(figsize=(4.2 * len(attentions) + 2.5, 3.4), layout="constrained")
    axes = fig.subplots(1, len(attentions), squeeze=False, sharex=True, sharey=True)[0]
    statuses, banded = set(), False
    for ax, attention in zip(axes, attentions):
        for pe in pes:
            combo = runs[(runs["pe"] == pe) & (runs["attention"] == attention)]
            finished = combo[combo["status"] == "finished"]
            # the finished seeds as one mean curve, each unfinished run on its own
            curves = [(list(finished["run_id"]), "finished")] if len(finished) else []
            unfinished = combo[combo["status"] != "finished"]
            curves += [([run_id], status) for run_id, status in zip(unfinished["run_id"], unfinished["status"])]
            for run_ids, status in curves:
                curve = _seed_mean(history, run_ids, x, metric)
                if curve.empty:
                    continue
                banded |= _draw_curve(ax, curve, pe, attention, sparse, status)
                if status != "finished":
                    statuses.add(status)
        if not ax.has_data():
            ax.text(0.5, 0.5, NA_TEXT, transform=ax.transAxes, ha="center", va="center", color="grey")
        ax.set_title(f"attention: {attention}")
        ax.set_xlabel(run_metrics.label(x))
        if x == run_metrics.TOKENS:  # 800k, not 800000: six-digit ticks run into each other
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(run_metrics.label(metric))
    _legend(fig, pes, attentions, "line", statuses, ("bars" if sparse else "band") if banded else None)
    return fig


def _draw_curve(ax, curve: pd.DataFrame, pe: str, attention: str, sparse: bool, status: str) -> bool:
    """One curve (mean over its runs), its end marked when unfinished; returns whether a seed band was drawn."""
    alpha = 1.0 if status == "finished" else UNFINISHED_ALPHA
    style = {"color": pe_color(pe), "linestyle": attention_linestyle(attention), "alpha": alpha}
    banded = bool((curve["n"] > 1).any())
    ci = curve["ci"].fillna(0)
    if sparse:
        ax.errorbar(curve["x"], curve["mean"], yerr=ci if banded else None, marker=attention_marker(attention),
                    capsize=3, **style)
    else:
        ax.plot(curve["x"], curve["mean"], linewidth=1.5, **style)
        if banded:
            ax.fill_between(curve["x"], curve["mean"] - ci, curve["mean"] + ci, color=pe_color(pe),
                            alpha=BAND_ALPHA, linewidth=0)
    if status != "finished":
        last = curve.iloc[-1]
        ax.plot([last["x"]], [last["mean"]], marker=STATUS_MARKERS.get(status, "?"), color=pe_color(pe),
                markersize=9, linestyle="none")
        ax.annotate(f"{pe} ({status})", (last["x"], last["mean"]), textcoords="offset points", xytext=(4, 4),
                    fontsize="x-small", color=pe_color(pe))
    return banded


def validation_curves(runs: pd.DataFrame, history: pd.DataFrame) -> Drawn:
    """Validation loss vs tokens from the runs evaluated at least MIN_EVALUATIONS times; the others are left
    out (a single final evaluation is a point, not a curve: the extrapolation figure and the tables have it).
    Inference-time variants have no history: not drawn, not counted."""
    runs = trained_runs(runs)
    counts = runs["run_id"].map(evaluation_counts(runs, history))
    curved, single = runs[counts >= MIN_EVALUATIONS], runs[counts < MIN_EVALUATIONS]
    at_end_only = (single["trainer.eval_every"] == 0).all()
    reason = f"evaluated fewer than {MIN_EVALUATIONS} times" + (
        " (trainer.eval_every=0: at the end only; set trainer.eval_every to draw validation curves)" if at_end_only
        else " (stopped before a second evaluation)")
    if curved.empty:
        return Drawn(None, [f"Validation-loss curves omitted: every run was {reason}"])
    notes = [f"Validation-loss curves: {len(single)} of {len(runs)} runs left out, {reason}"] if len(single) else []
    return Drawn(loss_curves(curved, history, run_metrics.TOKENS, run_metrics.VAL_LOSS), notes)


# ------------------------------------------------------------------------------------- bar charts


def _bar_panel(ax, combos: pd.DataFrame, metric: str, scale: float = 1.0) -> None:
    """One bar per PE x attention: mean ± 95 % CI over seeds; n/a where the metric is missing."""
    positions = np.arange(len(combos))
    means = combos[f"{metric} mean"].to_numpy(dtype="float64") * scale
    cis = combos[f"{metric} ci95"].to_numpy(dtype="float64") * scale
    for i, combo in enumerate(combos.to_dict("records")):
        if np.isnan(means[i]):
            continue
        ax.bar(positions[i], means[i], yerr=None if np.isnan(cis[i]) else cis[i], capsize=3,
               color=pe_color(combo["pe"]), hatch=attention_hatch(combo["attention"]), edgecolor="black",
               alpha=UNFINISHED_ALPHA if combo["unfinished"] else 1.0)
    top = np.nanmax(means + np.nan_to_num(cis))
    for i in np.flatnonzero(np.isnan(means)):
        ax.text(positions[i], 0.02 * top, NA_TEXT, ha="center", va="bottom", color="grey", fontsize="small")
    ax.set_ylim(0, top * 1.15)
    ax.set_xticks(positions, [f"{c['pe']} / {c['attention']}" + (f" ({c['unfinished']})" if c["unfinished"] else "")
                              for c in combos.to_dict("records")], rotation=45, ha="right", fontsize="small")
    ax.set_ylabel(run_metrics.label(metric))
    ax.grid(axis="y", alpha=0.3)


EFFICIENCY_PANELS = [(run_metrics.TOKENS_PER_S, 1.0), (run_metrics.PEAK_MEM, 1.0), (run_metrics.MFU, 100.0)]


def efficiency_bars(runs: pd.DataFrame) -> Drawn:
    """Throughput (median tokens/s), peak memory (GPU max allocated; CPU peak RSS) and MFU per combination,
    one panel each, stacked over shared x labels; a metric no run has (MFU on CPU) gets no panel. Trained
    runs only (an inference-time variant trained nothing)."""
    runs = trained_runs(runs)
    combos = _combinations(runs)
    panels = [(m, scale) for m, scale in EFFICIENCY_PANELS if combos[f"{m} mean"].notna().any()]
    notes = [f"{run_metrics.label(m)} panel left out: {na_reason(m, runs)}" for m, _ in EFFICIENCY_PANELS
             if m not in dict(panels)]
    if not panels:
        return Drawn(None, ["Throughput and memory figure omitted: no run logged throughput or memory"])
    fig = Figure(figsize=(max(5.0, 0.55 * len(combos)) + 2.5, 2.6 * len(panels) + 1.2), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    for ax, (metric, scale) in zip(axes, panels):
        _bar_panel(ax, combos, metric, scale)
    axes[-1].set_xlabel("PE / attention")
    _legend(fig, *_pes_and_attentions(runs), "bar", ci="bars" if (combos["n"] > 1).any() else None)
    return Drawn(fig, notes)


# ------------------------------------------------------------------------------------- heatmap


def hellaswag_heatmap(runs: pd.DataFrame, metric: str = HELLASWAG_ACC_NORM) -> Figure:
    """HellaSwag acc_norm as a PE x attention grid; cells without a value say n/a."""
    pes, attentions = _pes_and_attentions(runs)
    combos = _combinations(runs).set_index(["pe", "attention"])
    grid = np.full((len(pes), len(attentions)), np.nan)
    fig = Figure(figsize=(1.9 * len(attentions) + 2.5, 0.6 * len(pes) + 1.8), layout="constrained")
    ax = fig.subplots()
    for i, pe in enumerate(pes):
        for j, attention in enumerate(attentions):
            if (pe, attention) in combos.index:
                grid[i, j] = combos.loc[(pe, attention), f"{metric} mean"]
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    finite = grid[np.isfinite(grid)]
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto",
                      vmin=finite.min() if finite.size else 0.0, vmax=finite.max() if finite.size else 1.0)
    for i, pe in enumerate(pes):
        for j, attention in enumerate(attentions):
            text = NA_TEXT
            if (pe, attention) in combos.index:
                combo = combos.loc[(pe, attention)]
                text = metrics.format_mean_ci(metric, combo[f"{metric} mean"], combo[f"{metric} ci95"])
                if combo["unfinished"] and text != NA_TEXT:
                    text += f"\n({combo['unfinished']})"
            ax.text(j, i, text, ha="center", va="center", fontsize="small",
                    color="black" if text.startswith(NA_TEXT) or not finite.size or grid[i, j] > finite.mean()
                    else "white")
    ax.set_xticks(range(len(attentions)), attentions)
    ax.set_yticks(range(len(pes)), pes)
    ax.set_xlabel("attention mechanism")
    ax.set_ylabel("positional encoding")
    fig.colorbar(image, ax=ax, label=run_metrics.label(metric))
    return fig


# ------------------------------------------------------------------------------------- extrapolation


def _training_context(runs: pd.DataFrame) -> float | None:
    """L, the training context, when every run shares one (then the x axis is in tokens, with ×L on top)."""
    key = extrapolation_context_key(1)
    values = runs[key].dropna().unique() if key in runs else runs["model.block_size"].dropna().unique()
    return float(values[0]) if len(values) == 1 else None


def extrapolation_curves(runs: pd.DataFrame) -> Figure:
    """Final validation loss in non-overlapping windows (top row), the sliding-window loss (next row, when some
    run has one) and the change of the non-overlapping loss vs 1x of the same run (bottom row, when 1x was
    evaluated) against the evaluation context length, one column per attention. The training context L is a
    dashed line; the x axis is in tokens (bottom) and ×L (top) when all runs share one L, else in ×L. A PE
    that cannot run past some length (learned past 1x) ends in a large X marker with a note; lengths it
    cannot run are not drawn."""
    pes, attentions = _pes_and_attentions(runs)
    multipliers = run_metrics.extrapolation_multipliers(runs.columns)
    sliding = [m for m in run_metrics.sliding_multipliers(runs.columns) if runs[sliding_loss_key(m)].notna().any()]
    ticks = sorted(set(multipliers) | set(sliding))
    combos = _combinations(runs)
    length = _training_context(runs)
    # the Δ row needs the 1x loss to subtract
    views = ["loss"] + (["sliding"] if sliding else []) + (["delta"] if 1 in multipliers else [])
    fig = Figure(figsize=(4.4 * len(attentions) + 2.8, 3.2 * len(views)), layout="constrained")
    axes = fig.subplots(len(views), len(attentions), squeeze=False, sharex=True, sharey="row")
    statuses, banded, limited = set(), False, False
    for col, attention in enumerate(attentions):
        panel = combos[combos["attention"] == attention].to_dict("records")
        # error bars of PEs at the same length would hide each other: spread them a little along x
        dodge = 2.0 ** (DODGE_OCTAVES * (np.arange(len(panel)) - (len(panel) - 1) / 2))
        if not (combos["n"] > 1).any():
            dodge[:] = 1.0
        for row, view in enumerate(views):
            ax, delta = axes[row][col], view == "delta"
            key = {"loss": extrapolation_loss_key, "sliding": sliding_loss_key,
                   "delta": run_metrics.extrapolation_delta_key}[view]
            for combo, shift in zip(panel, dodge):
                points = [((m * length if length else m) * shift,
                           0.0 if delta and m == 1 else combo.get(f"{key(m)} mean", np.nan),
                           np.nan if delta and m == 1 else combo.get(f"{key(m)} ci95", np.nan))
                          for m in (sliding if view == "sliding" else multipliers)]
                points = [p for p in points if np.isfinite(p[1])]
                if not points:
                    continue
                x, y, ci = (np.array(v, dtype="float64") for v in zip(*points))
                has_band = bool(np.isfinite(ci).any())
                banded |= has_band
                color, alpha = pe_color(combo["pe"]), UNFINISHED_ALPHA if combo["unfinished"] else 1.0
                ax.errorbar(x, y, yerr=np.nan_to_num(ci) if has_band else None, capsize=3, color=color,
                            linestyle=attention_linestyle(attention), marker=attention_marker(attention), alpha=alpha,
                            label=combo["pe"])
                if np.isfinite(combo[LIMIT]):  # the PE stops here: make its last point impossible to miss
                    limited = True
                    ax.plot(x[-1:], y[-1:], color=color, alpha=alpha, **LIMIT_MARKER)
                    ax.annotate(f"{combo['pe']}: {cannot_run_text(combo)}", (x[-1], y[-1]), textcoords="offset points",
                                xytext=(28, 22 if delta else -28), fontsize="small", color=color, fontweight="bold",
                                bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor=color, alpha=0.9),
                                arrowprops=dict(arrowstyle="-", color=color), zorder=6)
                if combo["unfinished"]:
                    statuses.add(combo["unfinished"])
                    ax.annotate(f"{combo['pe']} ({combo['unfinished']})", (x[-1], y[-1]), fontsize="x-small",
                                textcoords="offset points", xytext=(4, 4), color=color)
            _extrapolation_axes(ax, ticks, length, top=row == 0, bottom=row == len(views) - 1)
            if row == 0:
                ax.set_title(f"attention: {attention}")
            if col == 0:
                ax.set_ylabel({"delta": "Δ loss vs 1× (nats)\nnon-overlapping windows" if sliding else
                               "Δ loss vs 1× (nats)",
                               "loss": "validation loss (nats)\nnon-overlapping windows" if sliding else
                               run_metrics.label(run_metrics.VAL_LOSS),
                               "sliding": f"sliding-window loss (nats)\n({stride_text(runs)})"}[view])
            if delta:
                ax.axhline(0.0, color="grey", linewidth=0.8)
    extra = [Line2D([], [], color="grey", linestyle="--", label="training context L")]
    if limited:
        extra.append(Line2D([], [], color="grey", label="last length the PE can run", **LIMIT_MARKER))
    _legend(fig, pes, attentions, "line", statuses, "bars" if banded else None, extra)
    return fig


def _extrapolation_axes(ax, multipliers: list[int], length: float | None, top: bool, bottom: bool) -> None:
    """log2 x axis ticked at the evaluated lengths: tokens at the bottom and ×L on top (one L), or ×L."""
    if not ax.has_data():
        ax.text(0.5, 0.5, NA_TEXT, transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_xscale("log", base=2)
    ax.ticklabel_format(axis="y", useOffset=False)  # "10.66", not "0.005" under "+1.066e1"
    ticks = [m * length for m in multipliers] if length else multipliers
    ax.set_xticks(ticks, [f"{t:.0f}" if length else f"{t}×" for t in ticks])
    ax.minorticks_off()
    ax.axvline(length or 1, color="grey", linestyle="--", linewidth=1)
    ax.grid(alpha=0.3)
    if bottom:
        ax.set_xlabel("evaluation context (tokens)" if length else "evaluation context (× the run's training L)")
    if top and length:
        secondary = ax.secondary_xaxis("top", functions=(lambda x: x / length, lambda m: m * length))
        secondary.set_xticks(multipliers, [f"{m}×L" for m in multipliers])
        secondary.minorticks_off()


def all_figures(runs: pd.DataFrame, history: pd.DataFrame, details: dict[str, dict] | None = None) -> dict[str, Drawn]:
    """Every figure of the report, by file stem: drawn, or None with the reason. `details`: run_id -> its
    eval_details.json (analysis/sources.py `Tables.details`), for the figures of analysis/positions.py."""
    from analysis import positions  # it draws with this module's helpers
    drawn = {
        "loss_vs_tokens": Drawn(loss_curves(runs, history, run_metrics.TOKENS)),
        "val_loss_vs_tokens": validation_curves(runs, history),
        "loss_vs_time": Drawn(loss_curves(runs, history, run_metrics.ELAPSED)),
        "efficiency": efficiency_bars(runs),
    }
    if runs[HELLASWAG_ACC_NORM].notna().any():
        drawn["hellaswag_acc_norm"] = Drawn(hellaswag_heatmap(runs))
    else:
        drawn["hellaswag_acc_norm"] = Drawn(None, [f"HellaSwag figure omitted: {na_reason(HELLASWAG_ACC_NORM, runs)}"])
    if run_metrics.extrapolation_multipliers(runs.columns):
        drawn["extrapolation"] = Drawn(extrapolation_curves(runs))
    else:
        drawn["extrapolation"] = Drawn(None, ["Length-extrapolation figure omitted: no run was evaluated at "
                                              "another context length"])
    return drawn | positions.position_figures(runs, details or {})
