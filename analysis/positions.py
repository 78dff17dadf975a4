"""The figures drawn from each run's eval_details.json (src/run_record.py `DETAILS_FILE`; analysis/sources.py
`Tables.details`): what the final evaluation measured beyond single numbers.

- `loss_by_position`: the loss of the prediction made at each position of a long evaluation window, binned;
- `bias_by_distance`: what a bias PE (ALiBi, KERPLE, FIRE, ...) adds to the attention logit at each distance,
  per head, first and last layer;
- `attention_stats`: attention entropy and mean attention distance per layer, at 1× and the longest context.

The conventions of analysis/figures.py hold: colour = PE (a variant `rope+yarn×4` in a shade of its base),
one column per attention, seeds averaged (a plain mean: these are diagnostics, not the paper's numbers), a
combination's finished runs used when it has some (analysis/tables.py `used_runs`). A record without the
section a figure needs (written before the evaluator stored it, a W&B run, a PE without a bias) is left out
with a note, and a figure no run has data for is omitted with its reason. A malformed section counts as
missing: never a crash.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from contextlib import contextmanager

import matplotlib.colors
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.figures import NA_TEXT, UNFINISHED_ALPHA, Drawn, _pes_and_attentions
from analysis.style import pe_color
from analysis.tables import used_runs

LOSS_BY_POSITION, BIAS_BY_DISTANCE, ATTENTION = "loss_by_position", "bias_by_distance", "attention"
BINS_PER_CONTEXT = 8  # loss_by_position: bins of max(1, L // 8) positions
CONTEXT_LINE = dict(color="grey", linestyle="--", linewidth=1)
SHORT_STYLE = dict(linestyle="-", marker="o")  # attention_stats: the shortest context evaluated (1×)
LONG_STYLE = dict(linestyle="--", marker="s")  # ... and the longest


@contextmanager
def _quiet_nanmean():
    """Silence numpy's "Mean of empty slice" where every seed is NaN (that value stays NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _section(detail: dict | None, name: str):
    """detail[name] when it holds something, else None."""
    value = detail.get(name) if isinstance(detail, dict) else None
    return value or None


def _multiplier_entries(section) -> dict[int, dict]:
    """{m: entry} of a per-multiplier section ("1": {...}, "8": {...}); entries that are not objects dropped."""
    if not isinstance(section, dict):
        return {}
    entries = {}
    for key, entry in section.items():
        try:
            m = int(key)
        except (TypeError, ValueError):
            continue
        if isinstance(entry, dict) and entry:
            entries[m] = entry
    return entries


def _combinations(runs: pd.DataFrame, details: dict[str, dict], name: str):
    """Per (pe, attention), sweeps pooled: its used runs (finished if any) that have section `name`, as records
    ordered by seed, and whether the combination has no finished run; plus the combinations without any."""
    found, missing = {}, []
    for (pe, attention), group in runs.groupby(["pe", "attention"], dropna=False, sort=False):
        used = used_runs(group).sort_values(["seed", "run_id"], na_position="last")
        records = [r for r in used.to_dict("records") if _section(details.get(r["run_id"]), name) is not None]
        if records:
            found[(pe, attention)] = (records, not (group["status"] == "finished").any())
        else:
            missing.append(f"{pe}/{attention}")
    return found, missing


def _seeds_text(seed_counts) -> str:
    """How the curves pool seeds, for a title (a single run is not called a mean)."""
    most = max(seed_counts, default=1)
    return f"mean of up to {most} seeds" if most > 1 else "one seed"


def _missing_note(figure: str, missing: list[str], what: str) -> list[str]:
    return [f"{figure}: left out (no {what} in eval_details.json): {', '.join(missing)}"] if missing else []


def _legend(fig: Figure, pes: list[str], extra: list, title: str = "PE (colour)") -> None:
    """The figure's one legend, outside on the right: PE colours, then the figure's own entries."""
    handles = [Line2D([], [], color=pe_color(pe), linewidth=2, label=pe) for pe in pes] + list(extra)
    fig.legend(handles=handles, loc="outside right upper", title=title, fontsize="small")


def _title(fig: Figure, text: str) -> None:
    """A short figure title, left-aligned: centred over the whole figure it would run into the legend."""
    fig.suptitle(text, x=0.01, ha="left", fontsize="medium")


def _na(ax) -> None:
    if not ax.has_data():
        ax.text(0.5, 0.5, NA_TEXT, transform=ax.transAxes, ha="center", va="center", color="grey")


# ------------------------------------------------------------------------------------- loss by position


def bin_width(block_size: int) -> int:
    return max(1, int(block_size) // BINS_PER_CONTEXT)


def binned_loss(loss, count, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(bin centre positions, count-weighted mean loss per bin) of per-position losses, bins of `width`
    positions (the last one may be shorter); a bin without any counted prediction is NaN."""
    loss = np.asarray(loss, dtype="float64")
    count = np.ones_like(loss) if count is None else np.asarray(count, dtype="float64")[:len(loss)]
    if len(count) < len(loss):
        count = np.pad(count, (0, len(loss) - len(count)))
    valid = np.isfinite(loss) & np.isfinite(count) & (count > 0)
    index = np.arange(len(loss)) // width
    weight = np.bincount(index, weights=np.where(valid, count, 0.0))
    total = np.bincount(index, weights=np.where(valid, loss * count, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(weight > 0, total / np.where(weight > 0, weight, 1.0), np.nan)
    starts = np.arange(len(mean)) * width
    ends = np.minimum(starts + width, len(loss))
    return (starts + ends - 1) / 2.0, mean


def position_curve(detail: dict) -> tuple[int, int, np.ndarray, np.ndarray] | None:
    """(L, m, bin centres, binned loss) from the largest multiplier of a run's loss_by_position; None when it
    has none (or it is malformed)."""
    entries = _multiplier_entries(_section(detail, LOSS_BY_POSITION))
    for m in sorted(entries, reverse=True):
        entry = entries[m]
        try:
            loss = entry["loss"]
            length = int(detail.get("block_size") or entries.get(1, {}).get("context") or entry["context"] // m)
            if not loss or length < 1:
                continue
            x, y = binned_loss(loss, entry.get("count"), bin_width(length))
        except (KeyError, TypeError, ValueError):
            continue
        return length, m, x, y
    return None


def loss_by_position(runs: pd.DataFrame, details: dict[str, dict]) -> Drawn:
    """Mean next-token loss against the position in the window (0 … m·L − 1, the largest multiplier m each
    run has: 8L for most PEs, L for learned), binned into bins of max(1, L // 8) positions (count-weighted),
    one panel per attention, one curve per PE (seed mean); a dashed line at the training context L."""
    found, missing = _combinations(runs, details, LOSS_BY_POSITION)
    curves, notes, lengths, widths, seed_counts = {}, [], set(), set(), []
    for (pe, attention), (records, unfinished) in found.items():
        parsed = [(r, c) for r in records if (c := position_curve(details[r["run_id"]])) is not None]
        if not parsed:
            missing.append(f"{pe}/{attention}")
            continue
        # seeds averaged on a shared grid: those with the most common (L, length) only
        grid, _ = Counter((c[0], len(c[2])) for _, c in parsed).most_common(1)[0]
        same = [(r, c) for r, c in parsed if (c[0], len(c[2])) == grid]
        if len(same) < len(parsed):
            notes.append(f"Loss by position, {pe}/{attention}: {len(parsed) - len(same)} seed(s) with another "
                         "window length left out of the mean")
        length, m, x, _ = same[0][1]
        with _quiet_nanmean():
            y = np.nanmean(np.stack([c[3] for _, c in same]), axis=0)
        curves[(pe, attention)] = (x, y, m, unfinished)
        seed_counts.append(len(same))
        lengths.add(length)
        widths.add(bin_width(length))
    notes += _missing_note("Loss by position", sorted(missing), "loss_by_position")
    if not curves:
        return Drawn(None, ["Loss-by-position figure omitted: no run has a loss by position in its "
                            "eval_details.json (records older than it, W&B runs)"])
    shown = runs[[(pe, a) in curves for pe, a in zip(runs["pe"], runs["attention"])]]
    pes, attentions = _pes_and_attentions(shown)
    fig = Figure(figsize=(4.6 * len(attentions) + 2.6, 4.8), layout="constrained")
    axes = fig.subplots(1, len(attentions), squeeze=False, sharex=True, sharey=True)[0]
    for ax, attention in zip(axes, attentions):
        for pe in pes:
            if (pe, attention) not in curves:
                continue
            x, y, m, unfinished = curves[(pe, attention)]
            ax.plot(x, y, color=pe_color(pe), linewidth=1.5, alpha=UNFINISHED_ALPHA if unfinished else 1.0,
                    label=pe)
        _na(ax)  # before the L line, which is data too
        for length in sorted(lengths):
            ax.axvline(length, **CONTEXT_LINE)
        ax.set_title(f"attention: {attention}")
        ax.set_xlabel("position in the window (tokens read − 1)")
        ax.set_xlim(left=0)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean next-token loss (nats)")
    width_text = "/".join(str(w) for w in sorted(widths))
    _title(fig, f"Loss by position, longest window per PE (bins of {width_text} positions, "
                f"{_seeds_text(seed_counts)})")
    _legend(fig, pes, [Line2D([], [], label="training context L", **CONTEXT_LINE)])
    return Drawn(fig, notes)


# ------------------------------------------------------------------------------------- bias by distance


def bias_layers(detail: dict) -> tuple[np.ndarray, dict[int, np.ndarray], int | None] | None:
    """(distance, {layer: [heads x distance] bias}, query position) of a run's bias_by_distance; None when it
    has none (or it is malformed)."""
    section = _section(detail, BIAS_BY_DISTANCE)
    if not isinstance(section, dict):
        return None
    try:
        distance = np.asarray(section["distance"], dtype="float64")
        layers = {}
        for key, heads in (section.get("layers") or {}).items():
            bias = np.atleast_2d(np.asarray(heads, dtype="float64"))
            if bias.size and bias.shape[-1] == len(distance):
                layers[int(key)] = bias
        query = section.get("query_position")
        query = int(query) if query is not None else None
    except (KeyError, TypeError, ValueError):
        return None
    return (distance, layers, query) if layers else None


def head_colors(color: str, heads: int) -> list[str]:
    """`heads` shades of `color`, light (head 0) to dark (the last head)."""
    rgb = np.array(matplotlib.colors.to_rgb(color))
    light, dark = 0.55 * rgb + 0.45, 0.55 * rgb
    if matplotlib.colors.to_hex(color) == "#000000":  # black (NoPE and its kin) has no darker shade
        light, dark = np.full(3, 0.75), np.zeros(3)
    steps = np.linspace(0.0, 1.0, heads) if heads > 1 else np.array([0.5])
    return [matplotlib.colors.to_hex((1 - t) * light + t * dark) for t in steps]


def bias_by_distance(runs: pd.DataFrame, details: dict[str, dict]) -> Drawn:
    """The bias each head adds to the attention logit against the distance q − k (0 … 4L − 1, read at one
    query position), first layer solid, last layer dashed, heads light to dark; one row per PE that has a
    bias, one column per attention; from the first seed of each combination (biases of different seeds are
    not averaged: a learned bias differs from seed to seed). PEs without a bias are left out."""
    found, missing = _combinations(runs, details, BIAS_BY_DISTANCE)
    with_details = {(r["pe"], r["attention"]) for r in runs.to_dict("records") if r["run_id"] in details}
    panels, seeds, queries, lengths = {}, set(), set(), set()
    for (pe, attention), (records, unfinished) in found.items():
        for record in records:  # the first seed whose section parses
            parsed = bias_layers(details[record["run_id"]])
            if parsed is not None:
                panels[(pe, attention)] = (*parsed, record, unfinished)
                seeds.add(record["seed"])
                if parsed[2] is not None:
                    queries.add(parsed[2])
                if details[record["run_id"]].get("block_size"):
                    lengths.add(int(details[record["run_id"]]["block_size"]))
                break
    if not panels:
        return Drawn(None, ["Bias-by-distance figure omitted: no run has an attention-score bias in its "
                            "eval_details.json (only bias PEs such as alibi, kerple, fire record one)"])
    shown = runs[[(pe, a) in panels for pe, a in zip(runs["pe"], runs["attention"])]]
    pes, attentions = _pes_and_attentions(shown)
    without = sorted({pe for pe, a in with_details if pe not in pes})
    seed_text = ", ".join(str(s) for s in sorted(s for s in seeds if not pd.isna(s))) or "n/a"
    notes = [f"Bias by distance: each panel is the first seed's run (seed {seed_text}); biases of different "
             "seeds are not averaged"]
    if without:
        notes.append(f"Bias by distance: PEs without an attention-score bias, not drawn: {', '.join(without)}")
    notes += _missing_note("Bias by distance", [m for m in missing if m.split("/")[0] in pes], "bias_by_distance")
    fig = Figure(figsize=(4.4 * len(attentions) + 2.8, 2.7 * len(pes) + 0.8), layout="constrained")
    axes = fig.subplots(len(pes), len(attentions), squeeze=False, sharex=True, sharey="row")
    most_heads, layer_names = 1, set()
    for row, pe in enumerate(pes):
        for col, attention in enumerate(attentions):
            ax = axes[row][col]
            if (pe, attention) in panels:
                distance, layers, _, record, unfinished = panels[(pe, attention)]
                first, last = min(layers), max(layers)
                for layer, linestyle in ((first, "-"), (last, "--")) if last != first else ((first, "-"),):
                    colors = head_colors(pe_color(pe), len(layers[layer]))
                    for head, (bias, color) in enumerate(zip(layers[layer], colors)):
                        ax.plot(distance, bias, color=color, linestyle=linestyle, linewidth=1.1,
                                alpha=UNFINISHED_ALPHA if unfinished else 1.0, label=f"layer {layer} head {head}")
                    most_heads = max(most_heads, len(layers[layer]))
                layer_names.add((first, last))
                ax.set_title(f"{pe} / attention: {attention} (seed {record['seed']})", fontsize="medium")
            _na(ax)  # before the L line, which is data too
            for length in sorted(lengths):
                ax.axvline(length, **CONTEXT_LINE)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(f"{pe}: bias added\nto the logit")
            if row == len(pes) - 1:
                ax.set_xlabel("distance q − k (tokens)")
    query_text = f", query at position {'/'.join(map(str, sorted(queries)))}" if queries else ""
    _title(fig, f"Bias by distance per head{query_text}")
    grey = head_colors("#555555", 2)
    firsts = "/".join(sorted({str(f) for f, _ in layer_names}))
    lasts = "/".join(sorted({str(last) for f, last in layer_names if last != f}))
    extra = [Line2D([], [], color="black", linestyle="-", label=f"first layer ({firsts})")]
    if lasts:
        extra.append(Line2D([], [], color="black", linestyle="--", label=f"last layer ({lasts})"))
    extra += [Line2D([], [], color=grey[0], linewidth=2, label="head 0 (light)"),
              Line2D([], [], color=grey[1], linewidth=2, label=f"head {most_heads - 1} (dark)" if most_heads > 1
                     else "one head"),
              Line2D([], [], label="training context L", **CONTEXT_LINE)]
    _legend(fig, pes, extra, title="PE (colour) / layer (style)")
    return Drawn(fig, notes)


# ------------------------------------------------------------------------------------- attention statistics

STATS = [("entropy", "attention entropy (nats)"), ("mean_distance", "mean attention\ndistance (tokens)")]


def layer_means(entry: dict, stat: str) -> np.ndarray | None:
    """Per layer, the mean over heads of `stat` ([[per head] per layer]); None when missing or malformed."""
    try:
        values = entry[stat]
        means = [float(np.nanmean(np.asarray(layer, dtype="float64"))) if len(layer) else math.nan
                 for layer in values]
    except (KeyError, TypeError, ValueError):
        return None
    return np.asarray(means) if means else None


def attention_stats(runs: pd.DataFrame, details: dict[str, dict]) -> Drawn:
    """Attention entropy (top row, nats) and mean attention distance (bottom row, tokens) against the layer
    index, one column per attention, one line per PE (mean over heads, seed mean): at the shortest context
    evaluated (1×: solid, circles) and the longest (e.g. 4×: dashed, squares)."""
    found, missing = _combinations(runs, details, ATTENTION)
    lines: dict[tuple, dict[int, dict[str, np.ndarray]]] = {}
    contexts: dict[int, set] = {}
    for (pe, attention), (records, unfinished) in found.items():
        per_multiplier: dict[int, dict[str, list]] = {}
        for record in records:
            for m, entry in _multiplier_entries(_section(details[record["run_id"]], ATTENTION)).items():
                for stat, _ in STATS:
                    if (means := layer_means(entry, stat)) is not None:
                        per_multiplier.setdefault(m, {}).setdefault(stat, []).append(means)
                if isinstance(entry.get("context"), int | float):
                    contexts.setdefault(m, set()).add(int(entry["context"]))
        averaged = {}
        for m, stats in per_multiplier.items():
            averaged[m] = {}
            for stat, seeds in stats.items():
                layers = Counter(len(s) for s in seeds).most_common(1)[0][0]
                with _quiet_nanmean():
                    averaged[m][stat] = np.nanmean(np.stack([s for s in seeds if len(s) == layers]), axis=0)
        if averaged:
            lines[(pe, attention)] = (averaged, unfinished)
        else:
            missing.append(f"{pe}/{attention}")
    notes = _missing_note("Attention statistics", sorted(missing), "attention statistics")
    if not lines:
        return Drawn(None, ["Attention-statistics figure omitted: no run has attention statistics in its "
                            "eval_details.json (records older than it, W&B runs)"])
    multipliers = sorted({m for averaged, _ in lines.values() for m in averaged})
    short, long = multipliers[0], multipliers[-1]
    styles = ((short, SHORT_STYLE), (long, LONG_STYLE)) if long != short else ((short, SHORT_STYLE),)
    shown = runs[[(pe, a) in lines for pe, a in zip(runs["pe"], runs["attention"])]]
    pes, attentions = _pes_and_attentions(shown)
    fig = Figure(figsize=(4.2 * len(attentions) + 2.8, 5.6), layout="constrained")
    axes = fig.subplots(len(STATS), len(attentions), squeeze=False, sharex=True, sharey="row")
    most_layers = 1
    for col, attention in enumerate(attentions):
        for row, (stat, label) in enumerate(STATS):
            ax = axes[row][col]
            for pe in pes:
                if (pe, attention) not in lines:
                    continue
                averaged, unfinished = lines[(pe, attention)]
                for m, style in styles:
                    y = averaged.get(m, {}).get(stat)
                    if y is None:
                        continue
                    most_layers = max(most_layers, len(y))
                    ax.plot(np.arange(len(y)), y, color=pe_color(pe), alpha=UNFINISHED_ALPHA if unfinished else 1.0,
                            markersize=5, linewidth=1.4, label=f"{pe} {m}×", **style)
            _na(ax)
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"attention: {attention}")
            if col == 0:
                ax.set_ylabel(label)
            if row == len(STATS) - 1:
                ax.set_xlabel("layer")
    for ax in axes.flat:
        ax.set_xticks(range(most_layers))

    def context(m: int) -> str:
        tokens = contexts.get(m, set())
        return f"{m}× context" + (f" ({'/'.join(f'{t:,}' for t in sorted(tokens))} tokens)" if tokens else "")

    extra = [Line2D([], [], color="grey", label=context(short), **SHORT_STYLE)]
    if long != short:
        extra.append(Line2D([], [], color="grey", label=context(long), **LONG_STYLE))
    _title(fig, f"Attention per layer (mean over heads and queries, {_seeds_text(len(r) for r, _ in found.values())})")
    _legend(fig, pes, extra, title="PE (colour) / context (style)")
    return Drawn(fig, notes)


# ------------------------------------------------------------------------------------- all three


def position_figures(runs: pd.DataFrame, details: dict[str, dict]) -> dict[str, Drawn]:
    """The three figures by file stem (drawn, or None with the reason), for figures.all_figures."""
    if not details:
        reason = "no run has an eval_details.json (records older than it, W&B runs)"
        return {"loss_by_position": Drawn(None, [f"Loss-by-position figure omitted: {reason}"]),
                "bias_by_distance": Drawn(None, [f"Bias-by-distance figure omitted: {reason}"]),
                "attention_stats": Drawn(None, [f"Attention-statistics figure omitted: {reason}"])}
    return {"loss_by_position": loss_by_position(runs, details),
            "bias_by_distance": bias_by_distance(runs, details),
            "attention_stats": attention_stats(runs, details)}
