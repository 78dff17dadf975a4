"""The evaluation suite the trainer runs every `trainer.eval_every` steps and at the end of training.

run_evaluation returns one flat dict keyed by the metric names in src/eval/config.py (the contract with
metrics.jsonl, W&B, summary.json and the analysis). Under torch.distributed every rank must call it
(the metrics are all-reduced) with the unwrapped model (not the DDP wrapper); all ranks get the same dict.
HellaSwag's items are GPT-2 BPE ids, so it scores only models of `data.tokenizer=gpt2` (check_tokenizer).
"""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from src.data.prepare import load_meta
from src.data.tokenizer import DEFAULT_TOKENIZER
from src.errors import ConfigError
from src.eval.config import EvalConfig
from src.eval.details import evaluation_details
from src.eval.extrapolation import check_stride, evaluate_extrapolation_by_position
from src.eval.hellaswag import evaluate_hellaswag
from src.eval.val_loss import evaluate_loss, val_tokens
from src.metrics import VAL_LOSS
from src.structured import to_dataclass


def eval_config(cfg: Any) -> EvalConfig:
    """Validate an eval config (EvalConfig, the composed `eval` DictConfig, or a dict) into an EvalConfig."""
    return to_dataclass(EvalConfig, cfg)


def check_eval_config(eval_cfg: Any, tokenizer: str, block_size: int) -> None:
    """One-line error when the suite cannot score a model of `tokenizer` and `block_size` as configured (HellaSwag
    on another tokenizer, a sliding-window stride longer than a context); call it before training."""
    check_tokenizer(eval_cfg, tokenizer)
    check_stride(eval_config(eval_cfg).extrapolation, block_size)


def check_tokenizer(eval_cfg: Any, tokenizer: str) -> None:
    """One-line error when an enabled part of the suite cannot score a model of `tokenizer`; call it before
    training, when the config is known."""
    if eval_config(eval_cfg).hellaswag.enabled and tokenizer != DEFAULT_TOKENIZER:
        raise ConfigError(f"HellaSwag needs the GPT-2 BPE tokenizer (data.tokenizer={DEFAULT_TOKENIZER}); this "
                          f"model reads data.tokenizer={tokenizer}: set eval.hellaswag.enabled=false (or eval=offline)")


@dataclass
class Evaluation:
    metrics: dict[str, float | int | None]  # the run record's metric names (src/metrics.py)
    details: dict | None  # the content of eval_details.json (src/eval/details.py); None unless asked for


def evaluate_suite(model: nn.Module, eval_cfg: Any, shard_dir: str | Path, device: str | torch.device,
                   autocast: Callable[[], AbstractContextManager] = nullcontext, details: bool = False) -> Evaluation:
    """val/loss, then extrapolation/* and hellaswag/* when enabled; with `details` (and eval.details.enabled)
    also eval_details.json's content. The model's train/eval mode is kept."""
    cfg = eval_config(eval_cfg)
    if cfg.hellaswag.enabled:  # before any scoring: the shards say which tokenizer the model reads
        check_tokenizer(cfg, load_meta(shard_dir)["tokenizer"])
    tokens = val_tokens(shard_dir)
    metrics: dict[str, float | int | None] = {
        VAL_LOSS: evaluate_loss(model, tokens, model.config.block_size, cfg.val.num_tokens, cfg.val.batch_size,
                                device, autocast),
    }
    by_position = {}
    if cfg.extrapolation.enabled:
        extrapolation, by_position = evaluate_extrapolation_by_position(model, tokens, cfg.extrapolation, device,
                                                                        autocast)
        metrics.update(extrapolation)
    if cfg.hellaswag.enabled:
        metrics.update(evaluate_hellaswag(model, cfg.hellaswag, device, autocast))
    wanted = details and cfg.details.enabled
    return Evaluation(metrics, evaluation_details(model, tokens, cfg.details, by_position, device, autocast)
                      if wanted else None)


def run_evaluation(model: nn.Module, eval_cfg: Any, shard_dir: str | Path, device: str | torch.device,
                   autocast: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, float | int | None]:
    """The metrics of `evaluate_suite` (no details): what the trainer logs every eval_every steps."""
    return evaluate_suite(model, eval_cfg, shard_dir, device, autocast).metrics
