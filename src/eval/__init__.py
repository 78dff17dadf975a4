"""Evaluation suite: validation loss on a fixed token budget, length extrapolation, HellaSwag.

    run_evaluation(model, cfg.eval, shard_dir, device, autocast) -> {"val/loss": ..., ...}
    python -m src.eval ckpt=<run dir or checkpoint dir> [eval=quick] [device=cpu]

The metric names it reports (a contract with the loggers and the analysis) are those of src/metrics.py.
"""

from src.eval.config import EvalConfig
from src.eval.extrapolation import evaluate_extrapolation
from src.eval.hellaswag import HellaSwagUnavailableError, ensure_hellaswag, evaluate_hellaswag
from src.eval.suite import eval_config, run_evaluation
from src.eval.val_loss import evaluate_loss, val_tokens

__all__ = [
    "EvalConfig",
    "HellaSwagUnavailableError",
    "ensure_hellaswag",
    "eval_config",
    "evaluate_extrapolation",
    "evaluate_hellaswag",
    "evaluate_loss",
    "run_evaluation",
    "val_tokens",
]
