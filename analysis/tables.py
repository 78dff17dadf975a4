"""The tables: the paper tables (validation loss and extrapolation; throughput and memory), one row per PE x
attention, as Markdown, LaTeX (booktabs) and CSV; and the reference tables, every metric per combination
(`final_metrics`) and per run (`runs`), as Markdown and CSV.

A combination's numbers are the mean and 95 % CI (analysis/stats.py) over its finished runs; only when none
has finished are its running or failed runs used, and its `status` always counts every run (e.g.
"1 finished, 1 failed"), so a partial result is never mistaken for a final one.

Paper tables: the best value per column is bold (among finished combinations, when at least two have one);
a column that is n/a for every combination is dropped, and the table says why in one line; a length a PE
cannot run (learned past 1x) reads "cannot run past 1×", never n/a or a number. Sliding-window losses
(`extrapolation/sliding_loss_x{m}`) are columns of their own, headed "sliding m×" with their stride (in the
caption when every run shares one); the Δ columns are of the non-overlapping losses.

Inference-time variants (`rope+yarn×4`, analysis/sources.py) are rows of their own, except in the training-cost
table: they are evaluations of a run's checkpoint and trained nothing.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import metrics
from analysis.sources import STATUSES, is_variant
from analysis.stats import CI_TEXT, mean_ci
from analysis.style import ATTENTION_ORDER, PE_ORDER, ordered
from src import metrics as run_metrics
from src.metrics import extrapolation_context_key

GROUP_KEYS = ["sweep", "pe", "attention"]
RUN_TABLE_COLUMNS = ["label", "sweep", "pe", "attention", "seed", "status", "step"]
LIMIT = "extrapolation limit"  # combination_table column: the largest m× a PE could run when it refused a longer one
NA = "n/a"

# Paper-table headers: (Markdown, LaTeX), short because the caption gives the units.
HEADERS = {
    run_metrics.VAL_LOSS: ("val loss", "val loss"),
    run_metrics.HELLASWAG_ACC_NORM: ("HellaSwag acc_norm", "HellaSwag acc\\textsubscript{norm}"),
    run_metrics.TOKENS_PER_S: ("tokens/s", "tokens/s"),
    run_metrics.PEAK_MEM: ("peak memory (MiB)", "peak mem.\\ (MiB)"),
    run_metrics.MFU: ("MFU", "MFU"),
    run_metrics.ELAPSED: ("training time (s)", "train time (s)"),
}
IDENTITY_HEADERS = {"sweep": "sweep", "pe": "PE", "attention": "attention", "n": "n", "status": "status"}


def table_metrics(runs: pd.DataFrame) -> list[str]:
    """The metrics the reference tables show: the fixed set (n/a where absent), extrapolation losses
    (non-overlapping, then sliding-window) after val/loss."""
    extrapolation = [run_metrics.extrapolation_loss_key(m) for m in run_metrics.extrapolation_multipliers(runs.columns)]
    extrapolation += [run_metrics.sliding_loss_key(m) for m in run_metrics.sliding_multipliers(runs.columns)]
    return metrics.SUMMARY_METRICS[:1] + extrapolation + metrics.SUMMARY_METRICS[1:]


def _format_strides(strides) -> str:
    return "/".join(f"{s:,.0f}" for s in sorted(strides))


def sliding_strides(runs: pd.DataFrame, metric: str | None = None) -> list[float]:
    """The strides (tokens, `extrapolation/stride`) of the runs with a sliding-window loss (`metric`, default:
    any), ascending; empty when none recorded one."""
    keys = [metric] if metric else [
        run_metrics.sliding_loss_key(m) for m in run_metrics.sliding_multipliers(runs.columns)]
    keys = [k for k in keys if k in runs]
    if not keys or run_metrics.EXTRAPOLATION_STRIDE not in runs:
        return []
    scored = runs[keys].notna().any(axis=1)
    return sorted(float(s) for s in runs.loc[scored, run_metrics.EXTRAPOLATION_STRIDE].dropna().unique())


def stride_text(runs: pd.DataFrame, metric: str | None = None) -> str:
    """"stride 32" (tokens), "stride 32/64" when the runs differ, "stride not recorded" when none says."""
    strides = sliding_strides(runs, metric)
    return f"stride {_format_strides(strides)}" if strides else "stride not recorded"


def with_deltas(runs: pd.DataFrame) -> pd.DataFrame:
    """`runs` plus `extrapolation/delta_x{m}` = loss at m x − loss at 1x of the same run (paired: the mean Δ
    and its CI are over seeds of the difference, not a difference of means)."""
    base = run_metrics.extrapolation_loss_key(1)
    if base not in runs:
        return runs
    longer = [m for m in run_metrics.extrapolation_multipliers(runs.columns) if m != 1]
    loss = run_metrics.extrapolation_loss_key
    return runs.assign(**{run_metrics.extrapolation_delta_key(m): runs[loss(m)] - runs[base] for m in longer})


def n_runs(count: int) -> str:
    """"1 run", "3 runs"."""
    return f"{count} run" if count == 1 else f"{count} runs"


def status_counts(statuses: pd.Series) -> str:
    counts = statuses.value_counts()
    return ", ".join(f"{counts[s]} {s}" for s in STATUSES if s in counts)


def unfinished_status(statuses: pd.Series) -> str:
    """'' when some run of the combination finished, else what its runs are (what figures mark)."""
    if (statuses == "finished").any():
        return ""
    return next(s for s in STATUSES if (statuses == s).any())


def used_runs(group: pd.DataFrame) -> pd.DataFrame:
    """The runs a combination's numbers come from: its finished runs if any, else all of them."""
    finished = group[group["status"] == "finished"]
    return finished if len(finished) else group


def extrapolation_limit(used: pd.DataFrame) -> float:
    """The largest multiplier the runs ran at, when a longer one was asked for and none of them could run it
    (its context is recorded, its loss null: learned past 1x); NaN otherwise."""
    multipliers = run_metrics.extrapolation_multipliers(used.columns)
    ran = [m for m in multipliers if used[run_metrics.extrapolation_loss_key(m)].notna().any()]
    refused = [m for m in multipliers if extrapolation_context_key(m) in used
               and used[extrapolation_context_key(m)].notna().any()
               and used[run_metrics.extrapolation_loss_key(m)].isna().all()]
    return float(max(ran)) if ran and refused else float("nan")


def _sort_combinations(frame: pd.DataFrame) -> pd.DataFrame:
    pe_rank = {pe: i for i, pe in enumerate(ordered(frame["pe"].dropna(), PE_ORDER))}
    attention_rank = {a: i for i, a in enumerate(ordered(frame["attention"].dropna(), ATTENTION_ORDER))}
    keys = frame.assign(_pe=frame["pe"].map(pe_rank), _attention=frame["attention"].map(attention_rank))
    return frame.loc[keys.sort_values(["sweep", "_pe", "_attention"], na_position="last").index].reset_index(
        drop=True)


def combination_table(runs: pd.DataFrame, shown: list[str] | None = None) -> pd.DataFrame:
    """One row per (sweep, pe, attention): runs, n (runs averaged), seeds, status, unfinished, the
    extrapolation limit, then `<metric> mean` / `ci95` (half-width) / `n` for each metric in `shown`
    (default: table_metrics)."""
    shown = table_metrics(runs) if shown is None else shown
    rows = []
    for (sweep, pe, attention), group in runs.groupby(GROUP_KEYS, dropna=False, sort=False):
        used = used_runs(group)
        row = {"sweep": sweep, "pe": pe, "attention": attention, "runs": len(group), "n": len(used),
               "seeds": ", ".join(str(s) for s in sorted(group["seed"].dropna().unique())),
               "status": status_counts(group["status"]), "unfinished": unfinished_status(group["status"]),
               LIMIT: extrapolation_limit(used)}
        for metric in shown:
            mean, half, n = mean_ci(used[metric]) if metric in used else (float("nan"), float("nan"), 0)
            row |= {f"{metric} mean": mean, f"{metric} ci95": half, f"{metric} n": n}
        rows.append(row)
    columns = [*GROUP_KEYS, "runs", "n", "seeds", "status", "unfinished", LIMIT]
    if not rows:
        return pd.DataFrame(columns=columns)
    return _sort_combinations(pd.DataFrame(rows))


# ------------------------------------------------------------------------------------- paper tables


@dataclass
class PaperTable:
    stem: str  # file stem: <stem>.md / .tex / .csv
    title: str
    caption: str
    frame: pd.DataFrame  # combination_table rows
    columns: list[str]  # the metrics shown, in order
    identity: list[str]  # the identity columns shown ("pe", "attention", "n", ...)
    dropped: list[str] = field(default_factory=list)  # "<what>: <why>", one per dropped column
    constant: list[str] = field(default_factory=list)  # "attention: regular": a column with one value, said once
    headers: dict[str, tuple[str, str]] = field(default_factory=dict)  # metric -> (Markdown, LaTeX) header


def _is_cannot_run(row: dict, metric: str) -> bool:
    multiplier = run_metrics.extrapolation_multiplier(metric)
    return (multiplier is not None and np.isfinite(row[LIMIT]) and multiplier > row[LIMIT]
            and not np.isfinite(row[f"{metric} mean"]))


def cannot_run_text(row: dict) -> str:
    return f"cannot run past {row[LIMIT]:.0f}×"


def _best(frame: pd.DataFrame, metric: str) -> str | None:
    """The best mean among finished combinations as displayed (so equal-looking values are all bold), None
    when fewer than two have one (nothing to compare)."""
    values = frame.loc[frame["unfinished"] == "", f"{metric} mean"].dropna()
    if len(values) < 2:
        return None
    return metrics.format_number(metric, values.max() if metrics.higher_is_better(metric) else values.min())


@dataclass
class Cell:
    text: str  # mean ± CI, "cannot run past 1×" or n/a, without the bold markup
    bold: bool = False
    limit: bool = False  # a "cannot run past" cell (LaTeX spans neighbouring ones)


def cells(table: PaperTable) -> list[list[Cell]]:
    """The metric cells of each row."""
    best = {metric: _best(table.frame, metric) for metric in table.columns}
    rows = []
    for row in table.frame.to_dict("records"):
        line = []
        for metric in table.columns:
            if _is_cannot_run(row, metric):
                line.append(Cell(cannot_run_text(row), limit=True))
                continue
            mean, n = row[f"{metric} mean"], row[f"{metric} n"]
            text = metrics.format_mean_ci(metric, mean, row[f"{metric} ci95"])
            if 0 < n < row["n"]:  # some runs lack this metric: say how many it rests on
                text += f" (n={n})"
            bold = row["unfinished"] == "" and metrics.format_number(metric, mean) == best[metric]
            line.append(Cell(text, bold=bold))
        rows.append(line)
    return rows


def _identity_text(row: dict, column: str) -> str:
    value = row[column]
    return NA if pd.isna(value) or value == "" else str(value)


def na_reason(metric: str, runs: pd.DataFrame) -> str:
    """Why no run has `metric`, in a few words, from what the runs' configs and summaries say."""
    if metric in (run_metrics.HELLASWAG_ACC_NORM, run_metrics.HELLASWAG_ACC):
        if (runs["data.tokenizer"] == "bytes").all():  # the deeper reason: it could not have been enabled
            return "not evaluated (it needs the GPT-2 BPE tokenizer; every run used data.tokenizer=bytes)"
        if (runs["eval.hellaswag.enabled"] == "false").all():
            return "not evaluated (eval.hellaswag.enabled=false in every run, as in the offline eval preset)"
        return "no run logged it"
    if metric == run_metrics.MFU:
        devices = runs["device"].dropna()  # a record cut short may not say
        if len(devices) and devices.str.startswith("cpu").all():
            return "null off-GPU (the runs trained on the CPU)"
        return "null for every run (no known peak FLOP/s for its device)"
    if run_metrics.is_sliding_loss(metric):
        return "no run has a sliding-window loss at this length"
    if run_metrics.extrapolation_multiplier(metric) is not None:
        return "no run has an extrapolation loss at this length"
    return "no run logged it"


def paper_table(runs: pd.DataFrame, stem: str, title: str, caption: str, shown: list[str],
                headers: dict[str, tuple[str, str]] | None = None) -> PaperTable:
    """A paper table of `shown` metrics; columns that are n/a everywhere dropped (with their reason), an
    identity column with a single value (one sweep, one attention) said once instead of repeated. `headers`:
    metric -> (Markdown, LaTeX) header, where HEADERS / the label does not fit."""
    headers = headers or {}
    frame = combination_table(runs, shown)
    kept, dropped, rows = [], [], frame.to_dict("records")
    for metric in shown:
        if any(np.isfinite(r[f"{metric} mean"]) or _is_cannot_run(r, metric) for r in rows):
            kept.append(metric)
        else:
            name = headers.get(metric, HEADERS.get(metric, (run_metrics.label(metric),)))[0]
            dropped.append(f"{name}: {na_reason(metric, runs)}")
    identity, constant = [], []
    for column in ["sweep", "pe", "attention"]:
        values = frame[column].dropna().unique()
        if column != "pe" and len(frame) > 1 and len(values) == 1:
            constant.append(f"{IDENTITY_HEADERS[column]}: {values[0]}")
        elif column != "sweep" or len(values) > 1:
            identity.append(column)
    identity.append("n")
    if (frame["status"] != frame["runs"].map(lambda r: f"{r} finished")).any():
        identity.append("status")
    return PaperTable(stem, title, caption, frame, kept, identity, dropped, constant, headers)


def full_caption(table: PaperTable) -> str:
    """The caption, plus what every row shares ("Attention: regular for every run.")."""
    return table.caption + "".join(f" {c[0].upper()}{c[1:]} for every run." for c in table.constant)


def _header(metric: str, latex: bool, headers: dict[str, tuple[str, str]] | None = None) -> str:
    if headers and metric in headers:
        return headers[metric][1 if latex else 0]
    if run_metrics.is_delta(metric):
        m = run_metrics.extrapolation_multiplier(metric)
        return f"$\\Delta$ {m}$\\times$" if latex else f"Δ {m}×"
    return HEADERS.get(metric, (run_metrics.label(metric),) * 2)[1 if latex else 0]


def loss_table(runs: pd.DataFrame) -> PaperTable:
    """Table 1: validation loss, Δ loss at each longer context vs 1x (non-overlapping windows), the
    sliding-window loss at each context that has one, HellaSwag acc_norm."""
    runs = with_deltas(runs)
    multipliers = run_metrics.extrapolation_multipliers(runs.columns)
    deltas = [run_metrics.extrapolation_delta_key(m) for m in multipliers if m != 1]
    sliding = [run_metrics.sliding_loss_key(m) for m in run_metrics.sliding_multipliers(runs.columns)]
    one_stride = len(sliding_strides(runs)) <= 1  # one stride (or none recorded): said once, in the caption
    headers = {}
    for metric in sliding:
        m = run_metrics.extrapolation_multiplier(metric)
        suffix = "" if one_stride else f" ({stride_text(runs, metric)})"
        headers[metric] = (f"sliding {m}×{suffix}", f"sliding {m}$\\times${latex_escape(suffix)}")
    caption = (f"Validation loss (nats) at the training context L, and Δ m× = loss at m·L − loss at L of the "
               f"same run (nats; lower = better extrapolation), both in non-overlapping windows. Mean ± {CI_TEXT} "
               "over n seeds; best per column in bold.")
    table = paper_table(runs, "table_loss", "Validation loss and length extrapolation", caption,
                        [run_metrics.VAL_LOSS, *deltas, *sliding, run_metrics.HELLASWAG_ACC_NORM], headers)
    if any(run_metrics.is_sliding_loss(m) for m in table.columns):
        strides = sliding_strides(runs)
        stride = (f"S = {_format_strides(strides)} tokens" if strides else "S tokens (not recorded)") if one_stride \
            else "S tokens (in each header)"
        table.caption += (f" Sliding m× = loss at m·L (nats) scored in sliding windows of m·L tokens moved by "
                          f"{stride}: every scored token has at least m·L − S tokens of context.")
    if run_metrics.HELLASWAG_ACC_NORM in table.columns:
        table.caption += " HellaSwag acc_norm: fraction of items correct (higher is better)."
    return table


EFFICIENCY_CAPTIONS = {
    run_metrics.TOKENS_PER_S: "median throughput (tokens/s)",
    run_metrics.PEAK_MEM: "peak memory (MiB; GPU: max allocated, CPU: peak RSS)",
    run_metrics.MFU: "MFU (% of the GPU's dense bf16 peak)",
    run_metrics.ELAPSED: "wall-clock training time (s)",
}


def efficiency_table(runs: pd.DataFrame) -> PaperTable:
    """Table 2: training throughput (median tokens/s), peak memory, MFU, training wall-clock time; of the
    trained runs only (an inference-time variant trained nothing: it is left out, and the caption says so)."""
    variants = is_variant(runs["pe"])
    table = paper_table(runs[~variants] if (~variants).any() else runs, "table_efficiency", "Throughput and memory",
                        "", list(EFFICIENCY_CAPTIONS))
    table.caption = (f"Training cost: {', '.join(EFFICIENCY_CAPTIONS[m] for m in table.columns)}. Mean ± "
                     f"{CI_TEXT} over n seeds; best per column in bold.")  # only the columns kept
    if variants.any() and (~variants).any():
        names = ", ".join(ordered(runs.loc[variants, "pe"], PE_ORDER))
        table.caption += f" Inference-time variants ({names}) are left out: they trained nothing."
    return table


def paper_markdown(table: PaperTable) -> str:
    header = [IDENTITY_HEADERS[c] for c in table.identity] + [_header(m, False, table.headers) for m in table.columns]
    rows = [[_identity_text(row, c) for c in table.identity] + [f"**{c.text}**" if c.bold else c.text for c in line]
            for row, line in zip(table.frame.to_dict("records"), cells(table))]
    return markdown_table(header, rows)


LATEX_ESCAPES = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_",
                 "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}"}


def latex_escape(text: str) -> str:
    text = "".join(LATEX_ESCAPES.get(ch, ch) for ch in text)
    for symbol, command in (("±", "$\\pm$"), ("×", "$\\times$"), ("Δ", "$\\Delta$"), ("−", "$-$"), ("·", "$\\cdot$")):
        text = text.replace(symbol, command)
    return text


def _latex_metric_cells(line: list[Cell]) -> list[str]:
    """LaTeX cells; a run of "cannot run past" cells becomes one \\multicolumn."""
    out, i = [], 0
    while i < len(line):
        span = 1
        while line[i].limit and i + span < len(line) and line[i + span].limit and line[i + span].text == line[i].text:
            span += 1
        text = latex_escape(line[i].text)
        text = f"\\textbf{{{text}}}" if line[i].bold else text
        out.append(f"\\multicolumn{{{span}}}{{c}}{{{text}}}" if span > 1 else text)
        i += span
    return out


def paper_latex(table: PaperTable) -> str:
    """A booktabs `table` float (\\usepackage{booktabs}): caption, label tab:<stem>, the same rows as the
    Markdown."""
    align = "".join("r" if c == "n" else "l" for c in table.identity) + "r" * len(table.columns)
    header = [IDENTITY_HEADERS[c] if c != "n" else "$n$" for c in table.identity]
    header += [_header(m, True, table.headers) for m in table.columns]
    caption = full_caption(table)
    lines = ["% requires \\usepackage{booktabs}", "\\begin{table}[t]", "\\centering",
             f"\\caption{{{latex_escape(caption)}}}", f"\\label{{tab:{table.stem.replace('_', '-')}}}",
             f"\\begin{{tabular}}{{{align}}}", "\\toprule", " & ".join(header) + " \\\\", "\\midrule"]
    for row, line in zip(table.frame.to_dict("records"), cells(table)):
        identity = [latex_escape(_identity_text(row, c)) for c in table.identity]
        lines.append(" & ".join(identity + _latex_metric_cells(line)) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def paper_csv(table: PaperTable, path: Path) -> None:
    """Numbers only: identity, then `<metric> mean` / `ci95` / `n` per metric; `cannot run past` holds the
    largest multiplier a combination could run (learned: 1) where a longer one was refused, else empty."""
    columns = ["sweep", "pe", "attention", "n", "runs", "seeds", "status"]
    columns += [f"{m} {part}" for m in table.columns for part in ("mean", "ci95", "n")]
    frame = table.frame.reindex(columns=columns)
    if any(_is_cannot_run(r, m) for r in table.frame.to_dict("records") for m in table.columns):
        frame["cannot run past"] = table.frame[LIMIT].astype("Int64")
    frame.to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL)


def write_paper_table(table: PaperTable, out_dir: Path) -> dict[str, Path]:
    paths = {fmt: out_dir / f"{table.stem}.{fmt}" for fmt in ("md", "tex", "csv")}
    paths["md"].write_text(paper_markdown(table))
    paths["tex"].write_text(paper_latex(table))
    paper_csv(table, paths["csv"])
    return paths


# ------------------------------------------------------------------------------------- reference tables


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)]) + "\n"


def _text(value) -> str:
    return NA if pd.isna(value) or value == "" else str(value)


def combination_markdown(table: pd.DataFrame, runs: pd.DataFrame) -> str:
    shown = table_metrics(runs)
    header = ["sweep", "PE", "attention", "runs", "seeds", "status", *(run_metrics.label(m) for m in shown)]
    rows = [[_text(r["sweep"]), _text(r["pe"]), _text(r["attention"]), r["runs"], _text(r["seeds"]), r["status"],
             *(metrics.format_mean_ci(m, r[f"{m} mean"], r[f"{m} ci95"]) for m in shown)]
            for r in table.to_dict("records")]
    return markdown_table(header, rows)


def runs_markdown(runs: pd.DataFrame) -> str:
    """One row per run; a metric no run logged is left out (the CSV has every column)."""
    shown = [m for m in table_metrics(runs) if m in runs and runs[m].notna().any()]
    header = [*RUN_TABLE_COLUMNS, *(run_metrics.label(m) for m in shown)]
    rows = [[*(_text(r[c]) for c in RUN_TABLE_COLUMNS), *(metrics.format_number(m, r[m]) for m in shown)]
            for r in runs.to_dict("records")]
    return markdown_table(header, rows)


def write_tables(runs: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """final_metrics.{csv,md} (per combination) and runs.{csv,md} (per run) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = combination_table(runs)
    paths = {name: out_dir / name for name in ("final_metrics.csv", "final_metrics.md", "runs.csv", "runs.md")}
    table.to_csv(paths["final_metrics.csv"], index=False)
    paths["final_metrics.md"].write_text(combination_markdown(table, runs))
    runs.to_csv(paths["runs.csv"], index=False)
    paths["runs.md"].write_text(runs_markdown(runs))
    return paths
