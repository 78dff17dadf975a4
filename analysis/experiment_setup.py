"""The report's set-up section: what was trained, on what, for how long, how it was scored, with which code
and hardware, read from the runs' configs and summaries (the set-up columns of `runs`, analysis/sources.py).

It describes the runs the tables average (per combination its finished runs, else all). A value the runs
do not share is given as its range ("0.100–0.120 M") or its list of values ("cpu, cuda"), and the section
ends saying so; a value no record holds reads "not recorded" (records written before the trainer stored it).
"""

from __future__ import annotations

import pandas as pd

from analysis.sources import SETUP_COLUMNS, is_variant
from analysis.style import ATTENTION_ORDER, PE_ORDER, ordered
from analysis.tables import GROUP_KEYS, status_counts, used_runs
from src import metrics as run_metrics
from src.data.tokenizer import DEFAULT_TOKENIZER, TOKENIZERS, describe_tokenizer
from src.metrics import extrapolation_context_key

NOT_RECORDED = "not recorded"
DIFFER_NOTE = "A range (a–b) or a list (a, b) means the runs differ in that value."


def _int(value: float) -> str:
    return f"{value:,.0f}"


def _general(value: float) -> str:
    return f"{value:g}"


def _millions(value: float) -> str:
    return f"{value / 1e6:.3f}"


def describe(values: pd.Series, fmt=_int, unit: str = "") -> str:
    """The one value the runs share, or the range (numbers) / list (text) of the values they have."""
    present = values.dropna()
    if present.empty:
        return NOT_RECORDED
    if pd.api.types.is_numeric_dtype(present):
        low, high = fmt(present.min()), fmt(present.max())
        return f"{low}{unit}" if low == high else f"{low}–{high}{unit}"
    return ", ".join(sorted(present.astype(str).unique()))


def _used(runs: pd.DataFrame) -> pd.DataFrame:
    groups = [used_runs(group) for _, group in runs.groupby(GROUP_KEYS, dropna=False, sort=False)]
    return pd.concat(groups) if groups else runs


def _tokenizer(runs: pd.DataFrame) -> str:
    # a record without data.tokenizer predates the option, when GPT-2 BPE was the only tokenizer
    names = runs["data.tokenizer"].fillna(DEFAULT_TOKENIZER).map(
        lambda name: describe_tokenizer(name) if name in TOKENIZERS else name)
    return describe(names)


def _extrapolation(runs: pd.DataFrame) -> str:
    multipliers = run_metrics.extrapolation_multipliers(runs.columns)
    if not multipliers:
        return "not evaluated"
    contexts = [describe(runs[extrapolation_context_key(m)])
                if extrapolation_context_key(m) in runs else NOT_RECORDED for m in multipliers]
    text = (f"loss at {', '.join(f'{m}×' for m in multipliers)} L = {', '.join(contexts)} tokens, "
            f"{describe(runs['eval.extrapolation.num_tokens'])} tokens each")
    if run_metrics.EXTRAPOLATION_STRIDE in runs and runs[run_metrics.EXTRAPOLATION_STRIDE].notna().any():
        text += (f", non-overlapping and in sliding windows moved on by "
                 f"{describe(runs[run_metrics.EXTRAPOLATION_STRIDE])} tokens")
    return text


def _hellaswag(runs: pd.DataFrame) -> str:
    measured = runs[run_metrics.HELLASWAG_ACC_NORM].notna() if run_metrics.HELLASWAG_ACC_NORM in runs else None
    if measured is None or not measured.any():
        return "not evaluated"
    items = describe(runs.loc[measured, "hellaswag/n"]) if "hellaswag/n" in runs else NOT_RECORDED
    return f"acc_norm on {items} validation items ({measured.sum()} of {len(runs)} runs)"


def _evaluation_schedule(runs: pd.DataFrame) -> str:
    every = runs["trainer.eval_every"].dropna()
    if every.empty:
        return NOT_RECORDED
    if (every == 0).all():
        return "at the end of training"
    return f"every {describe(every)} steps and at the end"


def _count(count, noun: str) -> str:
    return f"{count} {noun}" if str(count) == "1" else f"{count} {noun}s"



def setup_lines(runs: pd.DataFrame) -> list[str]:
    """The set-up as Markdown bullet lines, then one line saying how differing values read. Inference-time
    variant records (`rope+yarn×4`) are counted apart: they trained nothing."""
    variants = runs[is_variant(runs["pe"])]
    runs = runs[~is_variant(runs["pe"])]
    used = _used(runs)
    pes, attentions = ordered(runs["pe"], PE_ORDER), ordered(runs["attention"], ATTENTION_ORDER)
    seeds = ", ".join(str(s) for s in sorted(runs["seed"].dropna().unique())) or NOT_RECORDED
    per_combination = used.groupby(GROUP_KEYS, dropna=False).size()
    steps = used["step"].astype("float64")
    lines = [
        f"- **Runs**: {len(runs)} ({status_counts(runs['status'])}); "
        f"{_count(len(per_combination), 'combination')} of {_count(len(pes), 'PE')} ({', '.join(pes)}) and "
        f"{_count(len(attentions), 'attention mechanism')} ({', '.join(attentions)})"
        + (f"; plus {len(variants)} inference-time variant records of their checkpoints "
           f"({', '.join(ordered(variants['pe'], PE_ORDER))})" if len(variants) else ""),
        f"- **Model**: GPT-2 decoder, {describe(used['model.n_layer'])} layers, {describe(used['model.n_head'])} "
        f"heads, width {describe(used['model.n_embd'])}, training context L = {describe(used['model.block_size'])} "
        f"tokens, vocabulary {describe(used['model.vocab_size'])}; parameters "
        f"{describe(used['num_params'].astype('float64'), _millions, ' M')}",
        f"- **Data**: {describe(used['data.name'])}"
        + "".join(f" ({describe(used[key])})" for key in ("data.path", "data.hf_path") if used[key].notna().any())
        + f"; tokenizer {_tokenizer(used)}",
        f"- **Training**: {_count(describe(steps), 'step')} of {describe(used['trainer.total_batch_tokens'])} "
        f"tokens ({describe(used['tokens'])} tokens seen); AdamW, peak lr {describe(used['trainer.lr'], _general)}, "
        f"linear warm-up over {_count(describe(used['trainer.warmup_steps']), 'step')}, cosine decay to "
        f"{describe(used['trainer.min_lr_ratio'], _general)}× the peak, weight decay "
        f"{describe(used['trainer.weight_decay'], _general)}",
        f"- **Evaluation**: validation loss on {describe(used['eval.val.num_tokens'])} held-out tokens, "
        f"{_evaluation_schedule(used)}; length extrapolation: {_extrapolation(used)}; "
        f"HellaSwag: {_hellaswag(used)}",
        f"- **Seeds**: {seeds}; n = {describe(per_combination.astype('float64'))} per combination",
        f"- **Code and hardware**: git commit {describe(used['git_commit'])}, torch "
        f"{describe(used['torch_version'])}, device {describe(used['device'])}, world size "
        f"{describe(used['world_size'])}",
    ]
    if used["eval/preset"].notna().any():
        lines.append(f"- **Re-scored**: final metrics of {used['eval/preset'].notna().sum()} run(s) are from "
                     f"`python -m src.eval` with eval={describe(used['eval/preset'])}, whose budgets replace the "
                     "training config's above")
    described = [*SETUP_COLUMNS, "num_params", "tokens", "step"]
    return lines + (["", DIFFER_NOTE] if any(used[c].dropna().nunique() > 1 for c in described) else [])

