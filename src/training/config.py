"""Structured config schemas of the `trainer` and `logger` groups (stored as `trainer_schema`, `logger_schema`).

Their defaults are those of `python -m src.train`: conf/trainer/default.yaml and conf/logger/*.yaml list only what
differs from them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from src.errors import ConfigError
from src.structured import store_schema


@dataclass
class TrainerConfig:
    # CPU-friendly defaults: 50 steps x 2048 tokens, a couple of minutes on 2 cores (conf/experiment/ for more)
    max_steps: int = 50
    total_batch_tokens: int = 2048  # tokens per optimiser step over all ranks; micro-batches accumulate to it
    # sequences per forward pass per rank, or "auto": the largest power of two that fits in the device's memory,
    # found at the first step (training/trainer.py). `Any`, as OmegaConf has no int-or-str type: the
    # value is checked in __post_init__ and is an int or "auto" after it.
    micro_batch_size: Any = 16
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1  # on >= 2-D weights only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    log_every: int = 5
    eval_every: int = 0  # 0: only at the end (CPU time goes to training)
    ckpt_every: int = 25  # 0: only at the end
    keep_last: int = 2  # checkpoints kept on disk; 0 keeps all
    resume: str = "auto"  # auto: continue from the newest valid checkpoint in the run dir | never
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | float32 | bfloat16
    seed: int = 1337
    progress: bool = True  # a progress bar on rank 0

    def __post_init__(self) -> None:
        # `not x > 0` rather than `x <= 0`: NaN fails too. The device is checked against the machine in preflight.
        if self.resume not in ("auto", "never"):
            raise ConfigError(f"trainer.resume must be 'auto' or 'never', got '{self.resume}'")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"trainer.dtype must be auto, float32 or bfloat16, got '{self.dtype}'")
        self.micro_batch_size = _micro_batch_size(self.micro_batch_size)
        for key in ("max_steps", "total_batch_tokens", "log_every", "lr", "eps"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"trainer.{key} must be positive, got {getattr(self, key)}")
        for key in ("warmup_steps", "eval_every", "ckpt_every", "keep_last", "weight_decay", "grad_clip"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"trainer.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key} must be in [0, 1), got {getattr(self, key)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"trainer.min_lr_ratio (the final lr as a fraction of trainer.lr) must be in [0, 1], "
                              f"got {self.min_lr_ratio}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"trainer.seed must be in [0, 2**32), numpy's seed range, got {self.seed}")

    @property
    def auto_micro_batch(self) -> bool:
        return self.micro_batch_size == AUTO


AUTO = "auto"


def _micro_batch_size(value: Any) -> int | str:
    """trainer.micro_batch_size as a positive int or "auto"; a whole number given as a string (an environment
    interpolation, a quoted YAML value) counts as that number."""
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():
        value = int(value)
    if value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    shown = f"'{value}'" if isinstance(value, str) else value
    raise ConfigError(f"trainer.micro_batch_size must be positive (a whole number of sequences) or 'auto' (the "
                      f"largest that fits), got {shown}")


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb (metrics.jsonl and summary.json are always written)
    project: str = "pegrid"
    entity: str | None = None
    group: str | None = None  # one W&B group per sweep
    tags: list[str] = field(default_factory=list)
    mode: str = "online"  # online | offline | disabled
    # online only: sleep a per-job delay in [0, init_stagger_s) before wandb.init, so the jobs of a SLURM array
    # that start together do not all hit W&B at once (its rate limits; src/training/loggers.py `init_delay`)
    init_stagger_s: float = 0.0
    init_retries: int = 2  # online only: wandb.init tried again this many times on a communication error

    def __post_init__(self) -> None:
        if self.name not in ("none", "wandb"):
            raise ConfigError(f"logger.name must be 'none' or 'wandb', got '{self.name}'")
        if self.mode not in ("online", "offline", "disabled"):
            raise ConfigError(f"logger.mode must be online, offline or disabled, got '{self.mode}'")
        if not 0 <= self.init_stagger_s < math.inf:
            raise ConfigError(f"logger.init_stagger_s must be a number of seconds >= 0 (0: no stagger), "
                              f"got {self.init_stagger_s}")
        if self.init_retries < 0:
            raise ConfigError(f"logger.init_retries must be an integer >= 0, got {self.init_retries}")


store_schema("trainer", TrainerConfig)
store_schema("logger", LoggerConfig)

