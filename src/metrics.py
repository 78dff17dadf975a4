"""Every metric name of a run record and its human label, defined once (README "Run record" is the contract).

The trainer writes these keys into metrics.jsonl, summary.json and W&B; the evaluator returns them; the
analysis, the export's model card, the chat and the Streamlit page read and label them from here.
"""

from __future__ import annotations

import re

STEP = "step"
TOKENS = "tokens"  # training tokens seen
TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_GRAD_NORM = "train/grad_norm"
TOKENS_PER_S = "perf/tokens_per_s"
MFU = "perf/mfu"
STEP_TIME_MS = "perf/step_time_ms"
PEAK_MEM = "perf/peak_mem_mb"
ELAPSED = "time/elapsed_s"
WANDB_STEP = "trainer/step"  # the step metric the W&B logger defines; every other key is plotted against it

VAL_LOSS = "val/loss"
HELLASWAG_ACC = "hellaswag/acc"
HELLASWAG_ACC_NORM = "hellaswag/acc_norm"
HELLASWAG_N = "hellaswag/n"
EVAL_PRESET = "eval/preset"  # eval.json: the eval preset's name (python -m src.eval)
EVAL_CHECKPOINT = "eval/checkpoint"  # eval.json: the checkpoint dir it scored

EXTRAPOLATION_STRIDE = "extrapolation/stride"  # the sliding-window evaluation's stride (tokens); absent: not run
PE_VARIANT = "pe_variant"  # summary.json of an inference-time variant record (e.g. "yarn×4"), see below

_LOSS_PATTERN = re.compile(r"^extrapolation/loss_x(\d+)$")
_DELTA_PATTERN = re.compile(r"^extrapolation/delta_x(\d+)$")
_SLIDING_PATTERN = re.compile(r"^extrapolation/sliding_loss_x(\d+)$")


def extrapolation_loss_key(multiplier: int) -> str:
    """`extrapolation/loss_x{m}`: val loss at context m x block_size (None: the PE cannot run it)."""
    return f"extrapolation/loss_x{multiplier}"


def extrapolation_context_key(multiplier: int) -> str:
    """`extrapolation/context_x{m}`: the context length m x block_size that loss_x{m} was measured at."""
    return f"extrapolation/context_x{multiplier}"


def extrapolation_delta_key(multiplier: int) -> str:
    """`extrapolation/delta_x{m}`: loss at m x minus loss at 1x of the same run (derived by the analysis)."""
    return f"extrapolation/delta_x{multiplier}"


def sliding_loss_key(multiplier: int) -> str:
    """`extrapolation/sliding_loss_x{m}`: val loss at context m x block_size, scored in sliding windows (stride
    `extrapolation/stride`): every token after the first window is predicted with at least m·L − stride tokens of
    context, unlike loss_x{m}'s non-overlapping windows, whose first tokens have almost none."""
    return f"extrapolation/sliding_loss_x{multiplier}"


def extrapolation_multiplier(metric: str) -> int | None:
    """m of an `extrapolation/loss_x{m}`, `extrapolation/delta_x{m}` or `extrapolation/sliding_loss_x{m}` key,
    None for any other metric."""
    match = _LOSS_PATTERN.match(metric) or _DELTA_PATTERN.match(metric) or _SLIDING_PATTERN.match(metric)
    return int(match.group(1)) if match else None


def is_sliding_loss(metric: str) -> bool:
    return _SLIDING_PATTERN.match(metric) is not None


def sliding_multipliers(columns) -> list[int]:
    """The m of every `extrapolation/sliding_loss_x{m}` key among `columns`, ascending."""
    return sorted(int(m.group(1)) for c in columns if (m := _SLIDING_PATTERN.match(c)))


def variant_pe_name(pe: str, variant: str | None) -> str:
    """The PE name an inference-time variant is shown under: `rope+yarn×4` for pe rope, variant "yarn×4"
    (a record of `python -m src.eval ... model.pe.scaling.type=yarn`); `pe` itself when there is no variant."""
    return f"{pe}+{variant}" if variant else pe


def base_pe_name(name: str) -> str:
    """The trained PE of a (possibly variant) PE name: `rope+yarn×4` -> `rope`."""
    return name.split("+", 1)[0]


def is_extrapolation_loss(metric: str) -> bool:
    return _LOSS_PATTERN.match(metric) is not None


def is_delta(metric: str) -> bool:
    return _DELTA_PATTERN.match(metric) is not None


def extrapolation_multipliers(columns) -> list[int]:
    """The m of every `extrapolation/loss_x{m}` key among `columns`, ascending."""
    return sorted(int(m.group(1)) for c in columns if (m := _LOSS_PATTERN.match(c)))


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


def label(metric: str, context: int | None = None) -> str:
    """The metric's name for a reader, with its unit. `context`: for an extrapolation loss, the context length
    (tokens) it was measured at (`extrapolation_context_key`), shown as well when given."""
    if (m := _LOSS_PATTERN.match(metric)) is not None:
        return f"loss at {m.group(1)}× context" + (f" = {context:,} tokens" if context else "") + " (nats)"
    if (m := _DELTA_PATTERN.match(metric)) is not None:
        return f"Δ loss at {m.group(1)}× vs 1× (nats)"
    if (m := _SLIDING_PATTERN.match(metric)) is not None:
        where = f" = {context:,} tokens" if context else ""
        return f"sliding-window loss at {m.group(1)}× context{where} (nats)"
    return LABELS.get(metric, metric)


def label_in(metric: str, values: dict) -> str:
    """`label(metric)` with, for an extrapolation loss, the context it was measured at, read from the same record
    (`values`: a summary or an evaluation row holding `extrapolation_context_key(m)`)."""
    multiplier = extrapolation_multiplier(metric)
    context = values.get(extrapolation_context_key(multiplier)) if multiplier is not None else None
    return label(metric, int(context) if isinstance(context, int | float) else None)


# The final figures a trained model is presented with (model card, terminal chat, Streamlit page), besides the
# extrapolation losses: validation loss first, the figure the grid is compared on.
MODEL_SCORES = (VAL_LOSS, TRAIN_LOSS, HELLASWAG_ACC_NORM, HELLASWAG_ACC)


def is_model_score(metric: str) -> bool:
    """Whether a summary.json key is one of the final figures a trained model is shown with."""
    return metric in MODEL_SCORES or is_extrapolation_loss(metric)
