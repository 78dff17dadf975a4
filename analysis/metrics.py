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
_LOSS_PATTERN = re.compile("^" + re.escape(extrapolation_loss_key(999)).replace("999", r"(\d+)") + "$")


def extrapolation_multipliers(columns) -> list[int]:
    """The m of every `extrapolation/loss_x{m}` column, ascending."""
    return sorted(int(m.group(1)) for c in columns if (m := _LOSS_PATTERN.match(c)))


def label(metric: str) -> str:
    if (m := _LOSS_PATTERN.match(metric)) is not None:
        return f"loss at {m.group(1)}x context (nats)"
    return LABELS.get(metric, metric)


def format_number(metric: str, value: float) -> str:
    """A value at the precision that matters for its metric; n/a when missing."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if metric == MFU:
        return f"{100 * value:.1f}%"
    if metric in (TOKENS_PER_S, PEAK_MEM, TOKENS):
        return f"{value:,.0f}"
    if metric == ELAPSED:
        return f"{value:,.1f}"
    return f"{value:.3f}"


def format_mean_std(metric: str, mean: float, std: float) -> str:
    """`mean ± std` over seeds (just the mean for one run)."""
    text = format_number(metric, mean)
    if text == "n/a" or std is None or not math.isfinite(std):
        return text
    return f"{text} ± {format_number(metric, std)}"

