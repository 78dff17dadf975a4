"""Every user-facing value of a training run checked before any work starts, in about a second.

The schemas' __post_init__ checks hold the rules about one value (ranges, choices); `check_inputs` runs them
all and adds what needs several values or the machine: the device, the run directory, the model's vocabulary
against the tokenizer, the batch split over the ranks, the PE's and attention's own checks against the model,
the data source (there, readable, UTF-8, both splits non-empty) and a local HellaSwag file.

`python -m src.train` runs it twice: from `PreflightCallback` (conf/train.yaml), before Hydra creates the run
dir, so that bad input leaves nothing behind; and at the top of `train()`, for every other caller.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from src.data.config import DataConfig, resolve_cache_dir
from src.data.prepare import dataset_dir
from src.data.sources import DataUnavailableError, check_source, local_document_count
from src.data.tokenizer import check_vocab_fits
from src.device import resolve_device
from src.errors import ConfigError, exit_bad_input
from src.eval.hellaswag import HellaSwagUnavailableError, ensure_hellaswag
from src.eval.suite import check_eval_config, eval_config
from src.model import ATTENTION_REGISTRY, PE_REGISTRY, ModelConfig, model_config
from src.structured import to_dataclass
from src.training.config import LoggerConfig, TrainerConfig
from src.training.distributed import context_from_env

# What the train entrypoint reports as bad input (one line, exit 2) rather than as a bug.
BAD_INPUT = (ConfigError, DataUnavailableError, HellaSwagUnavailableError)


def check_inputs(cfg: DictConfig, run_dir: str | Path | None = None) -> None:
    """Raise one of BAD_INPUT, naming the value and the fix, if the composed train config `cfg` cannot run here;
    `run_dir` (if given) must be creatable. Writes nothing."""
    with _schema_errors_as_config_errors():
        dcfg = to_dataclass(DataConfig, cfg.data)  # first: the model's vocab_size interpolates data.tokenizer
        tcfg = to_dataclass(TrainerConfig, cfg.trainer)
        to_dataclass(LoggerConfig, cfg.logger)
        ecfg = eval_config(cfg.eval)
        mcfg = model_config(cfg.model)
        _check_components(mcfg)
        check_vocab_fits(mcfg.vocab_size, dcfg.tokenizer)
        check_eval_config(ecfg, dcfg.tokenizer, mcfg.block_size)  # HellaSwag on a byte model: now, not after training
    ranks = context_from_env()
    resolve_device(tcfg.device, ranks.local_rank)
    check_batch_split(tcfg.total_batch_tokens, tcfg.micro_batch_size, mcfg.block_size, ranks.world_size)
    if run_dir is not None:
        check_writable_dir(Path(run_dir), "runs_dir")
    check_data(dcfg)
    if ecfg.hellaswag.enabled and ecfg.hellaswag.path:  # a download (no path) is the trainer's to try
        ensure_hellaswag(ecfg.hellaswag)


def check_batch_split(total_batch_tokens: int, micro_batch_size: int | str, block_size: int, world_size: int) -> None:
    """ConfigError unless micro-batches of `micro_batch_size` sequences on every rank add up to exactly
    total_batch_tokens. With micro_batch_size=auto, micro-batch 1 must (then every size the search tries does:
    the powers of two that divide the sequences per rank, src/training/trainer.py)."""
    auto = micro_batch_size == "auto"
    per_micro_step = (1 if auto else micro_batch_size) * block_size * world_size
    if total_batch_tokens % per_micro_step:
        nearest = max(1, round(total_batch_tokens / per_micro_step)) * per_micro_step
        what = ("block_size x world_size (trainer.micro_batch_size=auto)" if auto
                else "micro_batch_size x block_size x world_size")
        raise ConfigError(f"trainer.total_batch_tokens ({total_batch_tokens}) must be a multiple of "
                          f"{what} = {per_micro_step}: e.g. trainer.total_batch_tokens={nearest}")


@contextmanager
def _schema_errors_as_config_errors() -> Iterator[None]:
    # The model's, PEs', attentions' and tokenizer's own checks raise ValueError, and so does OmegaConf for a
    # value of the wrong type: here, on the config alone, each of them is bad input.
    try:
        yield
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(str(error)) from error


def _check_components(mcfg: ModelConfig) -> None:
    """The PE's and the attention's checks against the model (rope: an even head dim, linformer: k < chunk_size,
    ...) live in their constructors: build one of each, as the GPT does (small modules, milliseconds)."""
    for registry, component in ((PE_REGISTRY, mcfg.pe), (ATTENTION_REGISTRY, mcfg.attention)):
        component_cfg, module_cls = registry.resolve(component)
        module_cls(component_cfg, mcfg)


def check_writable_dir(path: Path, key: str) -> None:
    """ConfigError, naming the config `key`, unless `path` is or can be made a directory this process may write
    in. Only a probe directory is made, in the nearest existing ancestor, and removed at once."""
    path = path.expanduser().absolute()
    existing = path
    while not os.path.exists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot create {path}: {existing} is a file, not a directory: set {key}=<a directory>")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".pegrid-probe-"))
    except OSError as error:  # root passes os.access() almost everywhere; only an attempt tells (/proc, read-only)
        raise ConfigError(f"cannot create {path}: {existing} does not let this process create directories "
                          f"({error.strerror}): set {key}=<a writable directory>") from None


def check_data(dcfg: DataConfig) -> None:
    """The source is there and readable and, unless already prepared, the cache dir is writable and neither
    split comes out empty."""
    check_source(dcfg)
    if (dataset_dir(dcfg) / "meta.json").is_file():  # written last, after prepare() checked both splits
        return
    check_writable_dir(resolve_cache_dir(dcfg), "data.cache_dir")
    # Only local sources are counted: an hf dataset is counted by downloading it, and a val_tokens split by
    # tokenising; prepare() checks those splits when it gets there.
    if dcfg.val_tokens is None and (count := local_document_count(dcfg)) is not None:
        dcfg.num_val_docs(count)


class PreflightCallback(Callback):
    """Hydra calls it after composing the config and before creating the run (or sweep) dir."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # for ${hydra:...} in hydra.run.dir; Hydra sets it next anyway
        try:
            check_inputs(config, config.hydra.run.dir)
        except BAD_INPUT as error:
            exit_bad_input(error)  # Hydra turns an exception raised here into a warning and carries on

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Each job's values are known only in the job (where train() checks them); the sweep dir is known now.
        try:
            check_writable_dir(Path(config.hydra.sweep.dir), "runs_dir")
        except ConfigError as error:
            exit_bad_input(error)
