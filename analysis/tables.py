"""The final-metrics tables: one row per PE x attention combination (mean ± std over its seeds) and one row
per run, as CSV (numbers, for further analysis) and Markdown (formatted, for the report).

A combination's numbers are averaged over its finished runs; only when none has finished are its running
or failed runs used, and its `status` column always counts every run (e.g. "1 finished, 1 failed"), so a
partial result is never mistaken for a final one.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis import metrics
from analysis.sources import STATUSES
from analysis.style import ATTENTION_ORDER, PE_ORDER, ordered

GROUP_KEYS = ["sweep", "pe", "attention"]
RUN_TABLE_COLUMNS = ["label", "sweep", "pe", "attention", "seed", "status", "step"]


def table_metrics(runs: pd.DataFrame) -> list[str]:
    """The metrics the tables show: the fixed set (n/a where absent), extrapolation losses after val/loss."""
    extrapolation = [metrics.extrapolation_loss_key(m) for m in metrics.extrapolation_multipliers(runs.columns)]
    return metrics.SUMMARY_METRICS[:1] + extrapolation + metrics.SUMMARY_METRICS[1:]


def status_counts(statuses: pd.Series) -> str:
    counts = statuses.value_counts()
    return ", ".join(f"{counts[s]} {s}" for s in STATUSES if s in counts)


def unfinished_status(statuses: pd.Series) -> str:
    """'' when some run of the combination finished, else what its runs are (what figures mark)."""
    if (statuses == "finished").any():
        return ""
    return next(s for s in STATUSES if (statuses == s).any())


def _sort_combinations(frame: pd.DataFrame) -> pd.DataFrame:
    pe_rank = {pe: i for i, pe in enumerate(ordered(frame["pe"].dropna(), PE_ORDER))}
    attention_rank = {a: i for i, a in enumerate(ordered(frame["attention"].dropna(), ATTENTION_ORDER))}
    keys = frame.assign(_pe=frame["pe"].map(pe_rank), _attention=frame["attention"].map(attention_rank))
    return frame.loc[keys.sort_values(["sweep", "_pe", "_attention"], na_position="last").index].reset_index(
        drop=True)


def combination_table(runs: pd.DataFrame, shown: list[str] | None = None) -> pd.DataFrame:
    """One row per (sweep, pe, attention): runs, seeds, status, unfinished, then `<metric> mean` / `std` for
    each metric in `shown` (default: table_metrics)."""
    shown = table_metrics(runs) if shown is None else shown
    rows = []
    for (sweep, pe, attention), group in runs.groupby(GROUP_KEYS, dropna=False, sort=False):
        finished = group[group["status"] == "finished"]
        used = finished if len(finished) else group
        row = {"sweep": sweep, "pe": pe, "attention": attention, "runs": len(group),
               "seeds": ", ".join(str(s) for s in sorted(group["seed"].dropna().unique())),
               "status": status_counts(group["status"]), "unfinished": unfinished_status(group["status"])}
        for metric in shown:
            values = used[metric].dropna() if metric in used else pd.Series(dtype="float64")
            row[f"{metric} mean"] = values.mean() if len(values) else float("nan")
            row[f"{metric} std"] = values.std() if len(values) > 1 else float("nan")
        rows.append(row)
    columns = [*GROUP_KEYS, "runs", "seeds", "status", "unfinished"]
    if not rows:
        return pd.DataFrame(columns=columns)
    return _sort_combinations(pd.DataFrame(rows))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)]) + "\n"


def _text(value) -> str:
    return "n/a" if pd.isna(value) or value == "" else str(value)


def combination_markdown(table: pd.DataFrame, runs: pd.DataFrame) -> str:
    shown = table_metrics(runs)
    header = ["sweep", "PE", "attention", "runs", "seeds", "status", *(metrics.label(m) for m in shown)]
    rows = [[_text(r["sweep"]), _text(r["pe"]), _text(r["attention"]), r["runs"], _text(r["seeds"]), r["status"],
             *(metrics.format_mean_std(m, r[f"{m} mean"], r[f"{m} std"]) for m in shown)]
            for r in table.to_dict("records")]
    return markdown_table(header, rows)


def runs_markdown(runs: pd.DataFrame) -> str:
    shown = table_metrics(runs)
    header = [*RUN_TABLE_COLUMNS, *(metrics.label(m) for m in shown)]
    rows = [[*(_text(r[c]) for c in RUN_TABLE_COLUMNS),
             *(metrics.format_number(m, r[m] if m in r else float("nan")) for m in shown)]
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
