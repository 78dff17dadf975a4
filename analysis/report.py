"""report.md: the final-metrics tables and every figure in one Markdown file, images linked relatively so
the output directory can be moved, zipped or committed as a whole."""

from __future__ import annotations

from pathlib import Path

from analysis.figures import all_figures, save_figure
from analysis.sources import Tables
from analysis.tables import status_counts, write_tables

FIGURE_TITLES = {
    "loss_vs_tokens": "Loss vs tokens",
    "loss_vs_time": "Loss vs wall-clock time",
    "throughput": "Throughput and MFU",
    "peak_memory": "Peak memory",
    "hellaswag_acc_norm": "HellaSwag acc_norm",
    "extrapolation": "Length extrapolation",
}


def write_report(tables: Tables, out_dir: Path, sources: list[str]) -> Path:
    """Write tables (CSV + Markdown), figures (PNG + PDF, under figures/) and report.md into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = tables.runs
    table_paths = write_tables(runs, out_dir)
    figure_dir = out_dir / "figures"
    figures = {stem: save_figure(fig, figure_dir, stem) for stem, fig in all_figures(runs, tables.history).items()}

    lines = [
        "# pegrid: PE x attention comparison", "",
        f"Sources: {', '.join(sources)}. {len(runs)} runs ({status_counts(runs['status'])}).", "",
        "## Final metrics", "",
        "Mean ± std over seeds, per combination; over its finished runs when it has any (`status` counts all "
        "of them). n/a: not logged.", "",
        table_paths["final_metrics.md"].read_text(),
        "CSV: [final_metrics.csv](final_metrics.csv)", "",
        "## Runs", "",
        table_paths["runs.md"].read_text(),
        "CSV (every column): [runs.csv](runs.csv)", "",
    ]
    failed = runs[runs["error"].notna() & (runs["status"] == "failed")]
    if len(failed):
        lines += ["Errors of failed runs:", ""]
        lines += [f"- `{r['label']}`: {r['error']}" for r in failed.to_dict("records")]
        lines.append("")
    lines += ["## Figures", ""]
    for stem, (png, pdf) in figures.items():
        png_link, pdf_link = png.relative_to(out_dir).as_posix(), pdf.relative_to(out_dir).as_posix()
        lines += [f"### {FIGURE_TITLES[stem]}", "", f"![{FIGURE_TITLES[stem]}]({png_link})", "",
                  f"PDF: [{pdf_link}]({pdf_link})", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
