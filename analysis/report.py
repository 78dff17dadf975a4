"""report.md: the set-up, the paper tables (each also as .tex and .csv), every figure and, as an appendix,
the per-run table, in one Markdown file; images and files linked relatively so the output directory can be
moved, zipped or committed as a whole."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.experiment_setup import setup_lines
from analysis.figures import all_figures, save_figure
from analysis.sources import Tables, is_variant
from analysis.stats import CI_TEXT
from analysis.tables import (
    PaperTable,
    efficiency_table,
    full_caption,
    loss_table,
    n_runs,
    paper_markdown,
    status_counts,
    write_paper_table,
    write_tables,
)

FIGURE_TITLES = {
    "loss_vs_tokens": "Training loss vs tokens",
    "val_loss_vs_tokens": "Validation loss vs tokens",
    "loss_vs_time": "Training loss vs wall-clock time",
    "efficiency": "Throughput and memory",
    "hellaswag_acc_norm": "HellaSwag acc_norm",
    "extrapolation": "Length extrapolation",
    "loss_by_position": "Loss by token position",
    "bias_by_distance": "Attention bias by distance",
    "attention_stats": "Attention entropy and distance by layer",
}
# One line under a figure on how to read it (figures whose axes do not say it all).
FIGURE_HINTS = {
    "loss_by_position": "Reading: left of the dashed line the model sees no more context than in training; a "
                        "curve that climbs right of it is a PE failing on positions it never saw, one that keeps "
                        "falling uses the longer context.",
    "bias_by_distance": "Reading: what the PE adds to each attention logit at distance q − k; a steep fall means a "
                        "strong recency bias (ALiBi's slopes), a curve that flattens lets far tokens compete.",
    "attention_stats": "Reading: low entropy / short distance = sharp, local attention; if the long-context "
                       "(dashed) values rise far above the 1× ones, attention spreads over positions it was not "
                       "trained on.",
}
WARNING = "> ⚠️ "


def _combination_names(frame: pd.DataFrame, sweeps: bool) -> str:
    return ", ".join((f"{r['sweep']}: " if sweeps else "") + f"{r['pe']}/{r['attention']}"
                     for r in frame.to_dict("records"))


def warnings(table: PaperTable) -> list[str]:
    """Visible warnings over the results: a single seed (no CI), combinations with no finished run."""
    frame, lines = table.frame, []
    sweeps = "sweep" in table.identity
    single = frame[frame["n"] < 2]
    if len(single) == len(frame):
        lines.append(f"{WARNING}**One seed per combination (n = 1).** No confidence intervals: a difference "
                     "between PEs may be seed noise. Train more seeds (e.g. `make study SEEDS=3`) for mean ± "
                     f"{CI_TEXT}.")
    elif len(single):
        lines.append(f"{WARNING}**n = 1 for {len(single)} of {len(frame)} combinations** "
                     f"({_combination_names(single, sweeps)}): shown without a confidence interval.")
    unfinished = frame[frame["unfinished"] != ""]
    if len(unfinished):
        lines.append(f"{WARNING}**{len(unfinished)} combination(s) without a finished run** "
                     f"({_combination_names(unfinished, sweeps)}): their numbers are from running or failed "
                     "runs, never bold, and faded in the figures.")
    return [line + "\n" for line in lines]


def table_section(number: int, table: PaperTable, paths: dict[str, Path], out_dir: Path) -> list[str]:
    links = " · ".join(f"[{p.name}]({p.relative_to(out_dir).as_posix()})" for fmt, p in paths.items()
                       if fmt != "md")
    lines = [f"### Table {number}: {table.title}", "", full_caption(table), "", paper_markdown(table)]
    lines += [f"Not shown: {reason}." for reason in table.dropped]
    if table.dropped:
        lines.append("")
    return lines + [f"LaTeX (booktabs) and CSV: {links}", ""]


def write_report(tables: Tables, out_dir: Path, sources: list[str]) -> Path:
    """Write the tables (Markdown, LaTeX, CSV), figures (PNG + PDF, under figures/) and report.md into
    out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = tables.runs
    reference = write_tables(runs, out_dir)
    paper = [loss_table(runs), efficiency_table(runs)]
    paper_paths = [write_paper_table(table, out_dir) for table in paper]

    variants = int(is_variant(runs["pe"]).sum())
    what = "an inference-time variant record" if variants == 1 else "inference-time variant records"
    of_which = (f"; {variants} of them {what} (`variants/<name>/`: a run's checkpoint evaluated with another PE "
                "setting)") if variants else ""
    lines = [
        "# pegrid: PE × attention comparison", "",
        f"Sources: {', '.join(sources)}. {n_runs(len(runs))} ({status_counts(runs['status'])}{of_which}).", "",
        *warnings(paper[0]),
        "## Set-up", "", *setup_lines(runs), "",
        "## Results", "",
    ]
    for number, (table, paths) in enumerate(zip(paper, paper_paths), start=1):
        lines += table_section(number, table, paths, out_dir)

    lines += ["## Figures", "",
              "Colour = PE, line style / hatch = attention, the same in every figure; several seeds: mean with "
              f"its {CI_TEXT}.", ""]
    figure_dir = out_dir / "figures"
    for stem, drawn in all_figures(runs, tables.history, tables.details).items():
        if drawn.figure is None:
            lines += [f"*{drawn.notes[0]}.*", ""]
            continue
        png, pdf = (p.relative_to(out_dir).as_posix() for p in save_figure(drawn.figure, figure_dir, stem))
        lines += [f"### {FIGURE_TITLES[stem]}", "", f"![{FIGURE_TITLES[stem]}]({png})", "", f"PDF: [{pdf}]({pdf})", ""]
        if stem in FIGURE_HINTS:
            lines += [FIGURE_HINTS[stem], ""]
        lines += [f"*{note}.*" for note in drawn.notes]
        if drawn.notes:
            lines.append("")

    lines += ["## Appendix: every run", "", reference["runs.md"].read_text(),
              "CSV (every column): [runs.csv](runs.csv). Every metric per combination (mean ± 95 % CI): "
              "[final_metrics.md](final_metrics.md), [final_metrics.csv](final_metrics.csv).", ""]
    failed = runs[runs["error"].notna() & (runs["status"] == "failed")]
    if len(failed):
        lines += ["Errors of failed runs:", ""]
        lines += [f"- `{r['label']}`: {r['error']}" for r in failed.to_dict("records")]
        lines.append("")
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
