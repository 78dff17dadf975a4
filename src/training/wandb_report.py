"""What a finished run logs to W&B at its end, besides the summary: the report's per-run figures and its final
evaluation as a table.

- `report/<stem>` (`wandb.Image`): each figure of analysis/positions.py (loss by position, bias by distance,
  attention statistics) that the run's eval_details.json has data for, drawn from a one-run `runs` table built
  from the run dir exactly as `python -m analysis.compare --runs <run dir>` builds it, so it is the figure the
  report shows for this run; rendered as the report saves it (analysis/figures.py `save_figure`: DPI, tight box);
- `report/final_eval` (`wandb.Table`, columns metric | label | value): the final evaluation's row of
  metrics.jsonl, labelled as the report labels metrics (src/metrics.py `label`).

Logged at the run's final step. Only imported when W&B is on (matplotlib and analysis/ are not loaded
otherwise), and never fatal: a failure to draw or log is one warning line, and the training run finishes.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

from src.metrics import STEP, VAL_LOSS, WANDB_STEP, label_in
from src.run_record import RunRecord

log = logging.getLogger(__name__)

FIGURE_KEY = "report/{stem}"
TABLE_KEY = "report/final_eval"
TABLE_COLUMNS = ["metric", "label", "value"]


def run_tables(run_dir: Path):
    """The run as the report reads it: `combine([load_local(...)])` of this one run dir (a one-row `runs`, its
    history, its eval_details.json). Not `load_local([run_dir])` itself: that would also pick up the records
    below it (variants/)."""
    from analysis.sources import Tables, combine, load_local_run, read_details, runs_frame

    row, history = load_local_run(run_dir)
    details = read_details(run_dir)
    return combine([Tables(runs_frame([row]), history, {row["run_id"]: details} if details is not None else {})])


def figure_images(run_dir: Path) -> dict[str, Any]:
    """{stem: PIL image} of the report's per-run figures that could be drawn (analysis/positions.py)."""
    from PIL import Image

    from analysis.figures import DPI
    from analysis.positions import position_figures

    tables = run_tables(run_dir)
    images = {}
    for stem, drawn in position_figures(tables.runs, tables.details).items():
        if drawn.figure is None:
            log.info("W&B report: %s", drawn.notes[0] if drawn.notes else f"{stem} not drawn")
            continue
        buffer = io.BytesIO()
        drawn.figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
        buffer.seek(0)
        images[stem] = Image.open(buffer)
        images[stem].load()
    return images


def final_evaluation(run_dir: Path) -> dict[str, Any]:
    """The metrics of the run's last evaluation row in metrics.jsonl (the final evaluation), {} if none."""
    rows = [r for r in RunRecord(run_dir).read_metrics() if VAL_LOSS in r]
    return {k: v for k, v in rows[-1].items() if k != STEP} if rows else {}


def eval_table_rows(metrics: dict[str, Any]) -> list[list]:
    """[metric, label, value] per metric; an extrapolation loss's label names the context it was measured at."""
    return [[metric, label_in(metric, metrics), None if value is None else float(value)]
            for metric, value in metrics.items()]


def _reason(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def final_report(wandb, run_dir: Path) -> dict[str, Any]:
    """What `log_final_report` logs: {report/<stem>: wandb.Image, report/final_eval: wandb.Table}. Figures that
    fail to draw are left out with one warning; the table is logged all the same."""
    payload: dict[str, Any] = {}
    try:
        from analysis.report import FIGURE_TITLES

        payload |= {FIGURE_KEY.format(stem=stem): wandb.Image(image, caption=FIGURE_TITLES.get(stem, stem))
                    for stem, image in figure_images(run_dir).items()}
    except Exception as err:  # a figure that cannot be drawn costs the figures, not the run or the table
        log.warning("W&B report: the figures were not logged (%s)", _reason(err))
    metrics = final_evaluation(run_dir)
    if metrics:
        payload[TABLE_KEY] = wandb.Table(columns=TABLE_COLUMNS, data=eval_table_rows(metrics))
    return payload


def log_final_report(run, run_dir: Path) -> None:
    """Log `final_report` to the W&B run at the run's final step; any failure is one warning, never raised:
    the training run has finished and stays so."""
    try:
        import wandb

        step = RunRecord(run_dir).read_summary().get(STEP)
        payload = final_report(wandb, run_dir)
        if payload:
            run.log({**({WANDB_STEP: step} if step is not None else {}), **payload})
    except Exception as err:
        log.warning("W&B report: the figures and eval table were not logged (%s)", _reason(err))
