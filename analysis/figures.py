"""The comparison figures. Each function takes the tidy tables and returns a matplotlib Figure (so tests can
inspect what was drawn); `save_figure` writes it as PNG (screens) and PDF (papers).

Conventions shared by every figure: colour = PE, line style / hatch = attention (analysis/style.py);
several seeds of a combination are drawn as their mean with a ± std band or error bar; a combination with
no finished run is drawn faded and marked with its status ("(failed)", "(running)"); a missing value is
written "n/a" rather than drawn as zero. Figures pool sweeps: select one with `--group`.

Figures are built with the object API (`Figure()`, no pyplot): no global backend or figure registry, so
nothing needs a display and nothing leaks; saving renders with Agg (PNG) and the PDF backend.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from analysis import metrics
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
from analysis.tables import combination_table, table_metrics
from src.eval.config import HELLASWAG_ACC_NORM, extrapolation_context_key, extrapolation_loss_key

FORMATS = ("png", "pdf")
DPI = 150
UNFINISHED_ALPHA = 0.45
NA_TEXT = "n/a"


def save_figure(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """stem.png and stem.pdf in out_dir; bbox 'tight' keeps the outside legend in the picture."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.{fmt}" for fmt in FORMATS]
    for path in paths:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return paths


def _combinations(runs: pd.DataFrame) -> pd.DataFrame:
    """Per PE x attention (sweeps pooled): mean / std of each metric (context lengths included) and the
    `unfinished` status."""
    contexts = [extrapolation_context_key(m) for m in metrics.extrapolation_multipliers(runs.columns)]
    return combination_table(runs.assign(sweep="all"), table_metrics(runs) + contexts)


def _pes_and_attentions(runs: pd.DataFrame) -> tuple[list[str], list[str]]:
    return ordered(runs["pe"], PE_ORDER), ordered(runs["attention"], ATTENTION_ORDER)


def _legend(fig: Figure, pes: list[str], attentions: list[str], style: str, statuses: set[str] = frozenset(),
            seeds_band: bool = False) -> None:
    """One legend for the whole figure, outside the axes on the right: PE colours, attention styles, the
    status markers used, and what the band means."""
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
    if seeds_band:
        handles.append(Patch(facecolor="grey", alpha=0.25, label="± std over seeds"))
    fig.legend(handles=handles, loc="outside right upper", title="PE (colour) / attention (style)",
               fontsize="small")


# ------------------------------------------------------------------------------------- loss curves


def _seed_mean(history: pd.DataFrame, run_ids: list[str], x: str, metric: str) -> pd.DataFrame:
    """Mean / std over seeds at each step (x averaged too: seeds' wall-clock times differ)."""
    rows = history[history["run_id"].isin(run_ids)].dropna(subset=[x, metric])
    grouped = rows.groupby("step")
    return pd.DataFrame({"x": grouped[x].mean(), "mean": grouped[metric].mean(),
                         "std": grouped[metric].std(), "n": grouped[metric].size()}).reset_index()


def loss_curves(runs: pd.DataFrame, history: pd.DataFrame, x: str = metrics.TOKENS) -> Figure:
    """Training (and, where logged, validation) loss against tokens or wall-clock time, one column of
    panels per attention mechanism, one curve per PE."""
    pes, attentions = _pes_and_attentions(runs)
    panels = [m for m in (metrics.TRAIN_LOSS, metrics.VAL_LOSS) if m in history and history[m].notna().any()]
    panels = panels or [metrics.TRAIN_LOSS]
    fig = Figure(figsize=(4.2 * max(len(attentions), 1) + 2.5, 3.2 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), max(len(attentions), 1), squeeze=False, sharex=True, sharey="row")
    statuses, banded = set(), False
    for row, metric in enumerate(panels):
        for col, attention in enumerate(attentions):
            ax = axes[row][col]
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
                    banded |= _draw_curve(ax, curve, pe, attention, metric == metrics.VAL_LOSS, status)
                    if status != "finished":
                        statuses.add(status)
            if not ax.has_data():
                ax.text(0.5, 0.5, NA_TEXT, transform=ax.transAxes, ha="center", va="center", color="grey")
            ax.set_title(f"attention: {attention}" if row == 0 else "")
            ax.set_xlabel(metrics.label(x))
            ax.set_ylabel(metrics.label(metric) if col == 0 else "")
            ax.grid(alpha=0.3)
    _legend(fig, pes, attentions, "line", statuses, banded)
    return fig


def _draw_curve(ax, curve: pd.DataFrame, pe: str, attention: str, sparse: bool, status: str) -> bool:
    """One curve (mean over its runs), its end marked when unfinished; returns whether a seed band was drawn."""
    alpha = 1.0 if status == "finished" else UNFINISHED_ALPHA
    style = {"color": pe_color(pe), "linestyle": attention_linestyle(attention), "alpha": alpha}
    banded = bool((curve["n"] > 1).any())
    if sparse:  # evaluations are few: points with error bars
        ax.errorbar(curve["x"], curve["mean"], yerr=curve["std"].fillna(0) if banded else None,
                    marker=attention_marker(attention), capsize=3, **style)
    else:
        ax.plot(curve["x"], curve["mean"], linewidth=1.5, **style)
        if banded:
            ax.fill_between(curve["x"], curve["mean"] - curve["std"].fillna(0), curve["mean"] + curve["std"].fillna(0),
                            color=pe_color(pe), alpha=0.2, linewidth=0)
    if status != "finished":
        last = curve.iloc[-1]
        ax.plot([last["x"]], [last["mean"]], marker=STATUS_MARKERS[status], color=pe_color(pe), markersize=9,
                linestyle="none")
        ax.annotate(f"{pe} ({status})", (last["x"], last["mean"]), textcoords="offset points", xytext=(4, 4),
                    fontsize="x-small", color=pe_color(pe))
    return banded


# ------------------------------------------------------------------------------------- bar charts


def _bar_panel(ax, combos: pd.DataFrame, metric: str, scale: float = 1.0) -> None:
    """One bar per PE x attention: mean ± std over seeds; n/a where the metric is missing."""
    positions = np.arange(len(combos))
    means = combos[f"{metric} mean"].to_numpy(dtype="float64") * scale
    stds = combos[f"{metric} std"].to_numpy(dtype="float64") * scale
    for i, combo in enumerate(combos.to_dict("records")):
        if np.isnan(means[i]):
            continue
        ax.bar(positions[i], means[i], yerr=None if np.isnan(stds[i]) else stds[i], capsize=3,
               color=pe_color(combo["pe"]), hatch=attention_hatch(combo["attention"]), edgecolor="black",
               alpha=UNFINISHED_ALPHA if combo["unfinished"] else 1.0)
    if np.isnan(means).all():
        why = " (null off-GPU,\ne.g. CPU runs)" if metric == metrics.MFU else ""
        ax.text(0.5, 0.5, f"{NA_TEXT}: no {metric} logged{why}", transform=ax.transAxes, ha="center", va="center",
                color="grey")
        ax.set_yticks([])
    else:
        top = np.nanmax(means + np.nan_to_num(stds))
        for i in np.flatnonzero(np.isnan(means)):
            ax.text(positions[i], 0.02 * top, NA_TEXT, ha="center", va="bottom", color="grey", fontsize="small")
        ax.set_ylim(0, top * 1.15)
    ax.set_xticks(positions, [f"{c['pe']} / {c['attention']}" + (f" ({c['unfinished']})" if c["unfinished"] else "")
                              for c in combos.to_dict("records")], rotation=45, ha="right", fontsize="small")
    ax.set_ylabel(metrics.label(metric))
    ax.set_xlabel("PE / attention")
    ax.grid(axis="y", alpha=0.3)


def throughput_bars(runs: pd.DataFrame) -> Figure:
    """Training throughput (median tokens/s per run) and MFU over the grid."""
    combos = _combinations(runs)
    fig = Figure(figsize=(max(8.0, 1.1 * len(combos)) + 2.5, 4.2), layout="constrained")
    tokens_ax, mfu_ax = fig.subplots(1, 2)
    _bar_panel(tokens_ax, combos, metrics.TOKENS_PER_S)
    _bar_panel(mfu_ax, combos, metrics.MFU, scale=100.0)
    _legend(fig, *_pes_and_attentions(runs), "bar")
    return fig


def memory_bars(runs: pd.DataFrame) -> Figure:
    """Peak memory per combination (GPU: max allocated; CPU: the process's peak RSS)."""
    combos = _combinations(runs)
    fig = Figure(figsize=(max(5.0, 0.6 * len(combos)) + 2.5, 4.2), layout="constrained")
    ax = fig.subplots()
    _bar_panel(ax, combos, metrics.PEAK_MEM)
    _legend(fig, *_pes_and_attentions(runs), "bar")
    return fig


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
                text = metrics.format_mean_std(metric, combo[f"{metric} mean"], combo[f"{metric} std"])
                if combo["unfinished"] and text != NA_TEXT:
                    text += f"\n({combo['unfinished']})"
            ax.text(j, i, text, ha="center", va="center", fontsize="small",
                    color="black" if text.startswith(NA_TEXT) or not finite.size or grid[i, j] > finite.mean()
                    else "white")
    ax.set_xticks(range(len(attentions)), attentions)
    ax.set_yticks(range(len(pes)), pes)
    ax.set_xlabel("attention mechanism")
    ax.set_ylabel("positional encoding")
    fig.colorbar(image, ax=ax, label=metrics.label(metric))
    return fig


# ------------------------------------------------------------------------------------- extrapolation


def extrapolation_curves(runs: pd.DataFrame) -> Figure:
    """Final validation loss against evaluation context length (1x, 2x, ... the training context), one panel
    per attention. Lengths a PE cannot run (learned beyond 1x) are null and skipped."""
    pes, attentions = _pes_and_attentions(runs)
    multipliers = metrics.extrapolation_multipliers(runs.columns)
    combos = _combinations(runs)
    fig = Figure(figsize=(4.2 * max(len(attentions), 1) + 2.5, 3.6), layout="constrained")
    axes = fig.subplots(1, max(len(attentions), 1), squeeze=False, sharey=True)
    statuses, banded = set(), False
    for col, attention in enumerate(attentions):
        ax = axes[0][col]
        for combo in combos[combos["attention"] == attention].to_dict("records"):
            points = [(combo.get(f"{extrapolation_context_key(m)} mean", np.nan),
                       combo[f"{extrapolation_loss_key(m)} mean"], combo[f"{extrapolation_loss_key(m)} std"])
                      for m in multipliers]
            points = [p for p in points if np.isfinite(p[0]) and np.isfinite(p[1])]
            if not points:
                continue
            context, loss, std = (np.array(v, dtype="float64") for v in zip(*points))
            has_band = bool(np.isfinite(std).any())
            banded |= has_band
            ax.errorbar(context, loss, yerr=np.nan_to_num(std) if has_band else None, capsize=3,
                        color=pe_color(combo["pe"]), linestyle=attention_linestyle(attention),
                        marker=attention_marker(attention), alpha=UNFINISHED_ALPHA if combo["unfinished"] else 1.0,
                        label=combo["pe"])
            if combo["unfinished"]:
                statuses.add(combo["unfinished"])
                ax.annotate(f"{combo['pe']} ({combo['unfinished']})", (context[-1], loss[-1]), fontsize="x-small",
                            textcoords="offset points", xytext=(4, 4), color=pe_color(combo["pe"]))
        if not ax.has_data():
            ax.text(0.5, 0.5, NA_TEXT, transform=ax.transAxes, ha="center", va="center", color="grey")
        else:  # context lengths double: log2 axis, ticks at the measured lengths
            ax.set_xscale("log", base=2)
            contexts = sorted({x for line in ax.lines for x in line.get_xdata()})
            ax.set_xticks(contexts, [f"{x:.0f}" for x in contexts])
            ax.minorticks_off()
        ax.set_title(f"attention: {attention}")
        ax.set_xlabel("evaluation context length (tokens)")
        ax.set_ylabel(metrics.label(metrics.VAL_LOSS) if col == 0 else "")
        ax.grid(alpha=0.3)
    _legend(fig, pes, attentions, "line", statuses, banded)
    return fig


def all_figures(runs: pd.DataFrame, history: pd.DataFrame) -> dict[str, Figure]:
    """Every figure of the report, by file stem."""
    return {
        "loss_vs_tokens": loss_curves(runs, history, metrics.TOKENS),
        "loss_vs_time": loss_curves(runs, history, metrics.ELAPSED),
        "throughput": throughput_bars(runs),
        "peak_memory": memory_bars(runs),
        "hellaswag_acc_norm": hellaswag_heatmap(runs),
        "extrapolation": extrapolation_curves(runs),
    }
