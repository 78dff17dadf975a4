"""Which metrics the analysis reads and how they are shown (name with unit, number format).

The evaluation metrics' names come from src/eval/config.py (the contract with the loggers); the training
rows' names are the trainer's (README "Run record").
"""

from __future__ import annotations

import math
import re

from src.eval.config import HELLASWAG_ACC, HELLASWAG_ACC_NORM, VAL_LOSS, extrapolation_loss_key

TRAIN_LOSS = "train/loss"
TOKENS = "tokens"
TOKENS_PER_S = "perf/tokens_per_s"
MFU = "perf/mfu"
PEAK_MEM = "perf/peak_mem_mb"
ELAPSED = "time/elapsed_s"

LABELS = {
    TRAIN_LOSS: "training loss (nats)",
    VAL_LOSS: "validation loss (nats)",
    HELLASWAG_ACC: "HellaSwag acc (fraction)",
    HELLASWAG_ACC_NORM: "HellaSwag acc_norm (fraction)",
    TOKENS: "tokens seen",
    TOKENS_PER_S: "throughput (tokens/s)",
    MFU: "MFU (% of peak bf16)",
    PEAK_MEM: "peak memory (MiB)",
    ELAPSED: "wall-clock time (s)",
}
# The final-metrics table's columns, in order (the extrapolation losses go after val/loss).
SUMMARY_METRICS = [VAL_LOSS, TRAIN_LOSS, HELLASWAG_ACC_NORM, HELLASWAG_ACC, TOKENS_PER_S, MFU, PEAK_MEM, ELAPSED,
                   TOKENS]
# Where a larger value is better (the bold "best" of a table column); for every other metric smaller is.
HIGHER_IS_BETTER = {HELLASWAG_ACC, HELLASWAG_ACC_NORM, TOKENS_PER_S, MFU}
_LOSS_PATTERN = re.compile("^" + re.escape(extrapolation_loss_key(999)).replace("999", r"(\d+)") + "$")
_DELTA_PATTERN = re.compile(r"^extrapolation/delta_x(\d+)$")


def extrapolation_delta_key(multiplier: int) -> str:
    """`extrapolation/delta_x{m}`: loss at m x minus loss at 1x of the same run (derived by the analysis)."""
    return f"extrapolation/delta_x{multiplier}"


def extrapolation_multiplier(metric: str) -> int | None:
    """m of an `extrapolation/loss_x{m}` or `extrapolation/delta_x{m}` key, None for any other metric."""
    match = _LOSS_PATTERN.match(metric) or _DELTA_PATTERN.match(metric)
    return int(match.group(1)) if match else None


def is_delta(metric: str) -> bool:
    return _DELTA_PATTERN.match(metric) is not None


def extrapolation_multipliers(columns) -> list[int]:
    """The m of every `extrapolation/loss_x{m}` column, ascending."""
    return sorted(int(m.group(1)) for c in columns if (m := _LOSS_PATTERN.match(c)))


def label(metric: str) -> str:
    if (m := _LOSS_PATTERN.match(metric)) is not None:
        return f"loss at {m.group(1)}× context (nats)"
    if (m := _DELTA_PATTERN.match(metric)) is not None:
        return f"Δ loss at {m.group(1)}× vs 1× (nats)"
    return LABELS.get(metric, metric)


def higher_is_better(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER


def format_number(metric: str, value: float, signed: bool = True) -> str:
    """A value at the precision that matters for its metric; n/a when missing. A Δ carries its sign unless
    `signed` is False (the half-width of its interval)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if _DELTA_PATTERN.match(metric):
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

