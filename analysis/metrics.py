"""Which metrics the analysis reads and how it shows them (table order, the better direction, number format).

The names and labels are src/metrics.py's (the run record's contract).
"""

from __future__ import annotations

import math

from src.metrics import (
    ELAPSED,
    HELLASWAG_ACC,
    HELLASWAG_ACC_NORM,
    MFU,
    PEAK_MEM,
    TOKENS,
    TOKENS_PER_S,
    TRAIN_LOSS,
    VAL_LOSS,
    is_delta,
)

# The final-metrics table's columns, in order (the extrapolation losses go after val/loss).
SUMMARY_METRICS = [VAL_LOSS, TRAIN_LOSS, HELLASWAG_ACC_NORM, HELLASWAG_ACC, TOKENS_PER_S, MFU, PEAK_MEM, ELAPSED,
                   TOKENS]
# Where a larger value is better (the bold "best" of a table column); for every other metric smaller is.
HIGHER_IS_BETTER = {HELLASWAG_ACC, HELLASWAG_ACC_NORM, TOKENS_PER_S, MFU}


def higher_is_better(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER


def format_number(metric: str, value: float, signed: bool = True) -> str:
    """A value at the precision that matters for its metric; n/a when missing. A Δ carries its sign unless
    `signed` is False (the half-width of its interval)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if is_delta(metric):
        text = f"{value:+.3f}" if signed else f"{value:.3f}"
        # no "-0.000"; a true minus sign (LaTeX output turns it into $-$)
        return "0.000" if float(text) == 0 else text.replace("-", "−")
    if metric == MFU:
        return f"{100 * value:.1f}%"
    if metric in (TOKENS_PER_S, PEAK_MEM, TOKENS):
        return f"{value:,.0f}"
    if metric == ELAPSED:
        return f"{value:,.1f}"
    return f"{value:.3f}"


def format_mean_ci(metric: str, mean: float, half_width: float) -> str:
    """`mean ± half-width of the 95 % CI` over seeds (just the mean for one run)."""
    text = format_number(metric, mean)
    if text == "n/a" or half_width is None or not math.isfinite(half_width):
        return text
    return f"{text} ± {format_number(metric, half_width, signed=False)}"
