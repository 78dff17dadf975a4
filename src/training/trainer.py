"""The training loop: one run of one PE x attention combination, from config to run record.

`train(cfg, run_dir)` is what `python -m src.train` calls inside Hydra's run dir; tests call it directly
with a config from Hydra's compose API. It locks the run dir and hands over to a `TrainingRun`, one attempt at
the run, whose methods are its phases: `setup` (data, model, resume, the record's start), then per step
`train_step`, `log`, `evaluate`, `checkpoint`, and `finish` (the summary, however the attempt ends); `run`
calls them in that order.

`trainer.micro_batch_size=auto` settles the micro-batch at the end of `setup` (`choose_micro_batch`): the size
stored in the checkpoint resumed from, else the largest power of two whose first step fits in the device's
memory. The search tries the first step's forward and backward passes on its real batches, halving the
micro-batch (and doubling the accumulation, so total_batch_tokens stays exact) on an out-of-memory error, and
puts the loader, the RNG and the gradients back after each try: the run then goes on exactly as a run with the
chosen size fixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import random
import signal
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from src.checkpoint import NonFiniteCheckpoint, latest_valid_checkpoint, list_checkpoints, save_checkpoint
from src.data import TokenLoader, ensure_prepared
from src.device import autocast_for, peak_memory_mb
from src.eval.hellaswag import ensure_hellaswag
from src.eval.suite import eval_config, evaluate_suite
from src.metrics import (
    ELAPSED,
    MFU,
    PEAK_MEM,
    STEP,
    STEP_TIME_MS,
    TOKENS,
    TOKENS_PER_S,
    TRAIN_GRAD_NORM,
    TRAIN_LOSS,
    TRAIN_LR,
    VAL_LOSS,
)
from src.model import build_model, model_config
from src.model.attention import attention_backend
from src.preflight import BAD_INPUT, check_batch_split, check_inputs
from src.provenance import provenance
from src.run_record import RunRecord
from src.structured import to_dataclass
from src.training.config import LoggerConfig, TrainerConfig
from src.training.distributed import DistContext, all_reduce_mean, init_distributed, shutdown_distributed
from src.training.fingerprint import FINGERPRINT_KEY, config_fingerprint
from src.training.flops import flops_per_token, peak_flops
from src.training.loggers import NoLogger, build_logger
from src.training.micro_batch import (
    any_rank_out_of_memory,
    is_out_of_memory,
    micro_batch_candidates,
    optimizer_state_reserve,
)
from src.training.optim import build_optimizer, lr_at
from src.training.run_lock import RunLock
from src.training.stop_signals import StopSignals

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The run stopped for a reason its record states and the user fixes, not a bug (src.train: one line, exit 1)."""


class MicroBatchDoesNotFit(TrainingDiverged):
    """trainer.micro_batch_size=auto, and not even one sequence per micro-batch fits in the device's memory. A
    TrainingDiverged for how src.train reports it (one line, exit 1; the summary says failed)."""


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train per `cfg` (the composed train.yaml), write the run record into run_dir, return the summary.

    The run dir is locked for the run's duration (one process per record). A stop signal (SIGINT, SIGTERM,
    SLURM's USR2) checkpoints the current step and returns a summary with status `interrupted`.
    """
    check_inputs(cfg, run_dir)  # bad input fails here, before anything is written
    tcfg = to_dataclass(TrainerConfig, cfg.trainer)
    dist_ctx, device = init_distributed(tcfg.device)
    record, stop = RunRecord(Path(run_dir)), StopSignals()
    try:
        run = TrainingRun(cfg, tcfg, dist_ctx, device, record, stop)  # reads the config, writes nothing
        record.run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(record.run_dir) if dist_ctx.is_main else contextlib.nullcontext(), stop:
            summary = run.run()
    finally:
        shutdown_distributed()
    if stop.requested:
        stop.chain()  # under submitit, USR2 now requeues the job, which resumes from the checkpoint just written
    return summary


class TrainingRun:
    """One attempt at a run: the state its phases share (config, model, optimizer, loader, record, logger,
    counters) and one method per phase. Only rank 0 writes the record and logs."""

    def __init__(self, cfg: DictConfig, tcfg: TrainerConfig, dist: DistContext, device: torch.device,
                 record: RunRecord, stop: StopSignals):
        self.cfg, self.tcfg, self.dist, self.device, self.record, self.stop = cfg, tcfg, dist, device, record, stop
        self.lcfg = to_dataclass(LoggerConfig, cfg.logger)
        self.mcfg = model_config(cfg.model)
        self.ecfg = eval_config(cfg.eval)
        self.name, self.tags = run_name_and_tags(cfg)
        self.resolved = OmegaConf.to_container(cfg, resolve=True)
        # check_inputs made sure the micro-batches divide total_batch_tokens; with auto, choose_micro_batch sets both
        self.micro_batch_size: int | None = None if tcfg.auto_micro_batch else tcfg.micro_batch_size
        self.grad_accum = None if tcfg.auto_micro_batch else self.accumulation(tcfg.micro_batch_size)
        self.resumed_micro_batch: int | None = None  # the size in the checkpoint resumed from, if it has one
        self.attention_backend: str | None = None  # the path the training forward's attention takes, once known
        self.autocast = autocast_for(device, tcfg.dtype)
        self.logger = NoLogger()  # rank 0's tracker once setup has built it
        self.num_params: int | None = None  # known once setup has built the model
        self.step = 0  # optimizer steps done; start_step after a resume
        self.last_checkpoint: int | None = None
        self.elapsed_before, self.started = 0.0, time.perf_counter()  # started again when the loop starts
        self.last_loss, self.eval_metrics = float("nan"), {}
        self.window_tokens, self.window_time = 0, 0.0  # since the last training row

    # ------------------------------------------------------------------------------------------ the attempt
    def run(self) -> dict:
        """setup; train_step (log, evaluate, checkpoint when due) until max_steps or a stop signal; the final
        checkpoint, then the final evaluation; finish writes the summary however this ends."""
        try:
            finished = self.setup()
        except (Exception, KeyboardInterrupt) as err:
            self.fail_setup(err)
            raise
        if finished is not None:
            return finished
        tcfg, main = self.tcfg, self.dist.is_main
        # any other BaseException (SystemExit) leaves the run "running": whoever raised it resumes it
        status, error, stopped_by = "running", None, None
        self.started = time.perf_counter()
        bar = tqdm(total=tcfg.max_steps, initial=self.step, desc=self.name, disable=not (tcfg.progress and main),
                   dynamic_ncols=True)
        first_step = self.step + 1
        try:
            while self.step < tcfg.max_steps and self.stop_signal() is None:
                loss, norm, lr = self.train_step()
                if self.step == first_step:
                    self.recheck_attention_backend()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
                if main and (self.step % tcfg.log_every == 0 or self.step == tcfg.max_steps):
                    self.log(loss, norm, lr)
                if tcfg.eval_every and self.step % tcfg.eval_every == 0 and self.step < tcfg.max_steps:
                    self.eval_metrics = self.evaluate()
                if tcfg.ckpt_every and self.step % tcfg.ckpt_every == 0 and self.step < tcfg.max_steps:
                    self.checkpoint()
            bar.close()
            self.checkpoint()  # before the final evaluation: an evaluation that crashes must not cost training steps
            stopped_by = self.stop_signal()
            if stopped_by:
                status = "interrupted"
                saved = "checkpointed" if self.step else "nothing trained yet"
                error = f"stopped by {stopped_by.name} at step {self.step}; {saved}: rerun the same command to resume"
            else:
                # resumed after the final evaluation was logged but before the summary was written: reuse it
                self.eval_metrics = logged_evaluation(self.record, self.step) or self.evaluate(final=True)
                status = "finished"
        except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of this step, the previous one is kept
            status, error, stopped_by = "interrupted", self.second_sigint(), signal.SIGINT
            raise
        except Exception as err:
            status, error = "failed", error_line(err)
            raise
        finally:
            bar.close()
            summary = self.finish(status, error, stopped_by)
        return summary

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> dict | None:
        """Seed, data, model, optimizer, resume, logger, and the summary's `running`. Returns the summary
        instead if the run is already finished (nothing to do)."""
        tcfg, main = self.tcfg, self.dist.is_main
        seed_everything(tcfg.seed)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if tcfg.resume == "never" and main and self.record.has_record():
            moved = self.record.move_aside()  # a fresh start never appends to, or resumes, the old record
            log.warning("trainer.resume=never: the existing run record in %s was moved to %s", self.record.run_dir,
                        moved)
        self.shard_dir = self.prepare_data()
        self.loader = TokenLoader(self.shard_dir, "train", self.micro_batch_size or 1, self.mcfg.block_size,
                                  tcfg.seed, self.dist.rank, self.dist.world_size)  # auto: its size comes later
        self.model = build_model(self.mcfg).to(self.device)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.optimizer = build_optimizer(self.model, tcfg, self.device.type)
        if tcfg.resume == "auto":
            self.resume()
        previous = self.record.read_summary()
        if self.step >= tcfg.max_steps and previous.get("status") == "finished":
            log.info("%s already finished (step %d); nothing to do", self.record.run_dir, self.step)
            return previous
        if main:
            self.record.truncate_after(self.step)  # also from scratch: rows of an attempt without a valid checkpoint go
            self.record.save_config(self.cfg)
        self.train_model = torch.compile(self.model) if tcfg.compile else self.model
        if self.dist.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.train_model, device_ids=device_ids)
        # eagerly, before the first training forward (the search's, compiled with trainer.compile): where a layer
        # would use FlexAttention, this runs its probe, and a compiled model cannot fall back by itself
        self.attention_backend = self.training_attention_backend()
        self.choose_micro_batch()
        self.flops_token = flops_per_token(self.model, self.mcfg.block_size)
        self.peak = peak_flops(self.device)
        if main:
            self.logger = build_logger(self.lcfg, self.record.run_dir, self.name, self.resolved, self.tags)
            self.record.update_summary(**self.summary_base(), status="running", error=None, stopped_by=None,
                                       **{STEP: self.step})
        return None

    def prepare_data(self) -> Path:
        """The shard dir. Rank 0 checks HellaSwag and prepares the data; the others wait, then find the shards."""
        if self.ecfg.hellaswag.enabled and self.dist.is_main:
            ensure_hellaswag(self.ecfg.hellaswag)  # offline or a wrong path: fail now, not at the first evaluation
        shard_dir = ensure_prepared(self.cfg.data) if self.dist.is_main else None
        if self.dist.enabled:
            torch.distributed.barrier()
            shard_dir = ensure_prepared(self.cfg.data)
        return shard_dir

    def resume(self) -> None:
        """Continue from the newest valid checkpoint in the run dir, if there is one."""
        found = latest_valid_checkpoint(self.record.checkpoint_dir, self.model)
        if found is None:
            return
        ckpt_dir, state = found
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        restore_rng_state(state["rng"])
        self.step = self.last_checkpoint = state["step"]
        self.resumed_micro_batch = state.get("micro_batch_size")  # absent in checkpoints of earlier versions
        self.elapsed_before = state.get("elapsed_s", 0.0)
        match_thread_count(state.get("num_threads"), self.device)
        log.info("resumed from %s (step %d)", ckpt_dir, self.step)

    def training_attention_backend(self) -> str:
        """`attention_backend` of the model here, under the training autocast (so for its dtype): "flex", "sdpa",
        "sdpa+bias-mask", "linformer-dense" or "explicit", FlexAttention's fallback included."""
        with self.autocast():
            return attention_backend(self.model, self.device)

    def recheck_attention_backend(self) -> None:
        """After this attempt's first step: a FlexAttention call that failed in it fell back to the dense path for
        good, so the summary's attention_backend is updated if it changed (rank 0 writes it)."""
        backend = self.training_attention_backend()
        if backend != self.attention_backend:
            log.warning("the attention backend changed during the first step: %s -> %s", self.attention_backend,
                        backend)
            self.attention_backend = backend
            if self.dist.is_main:
                self.record.update_summary(attention_backend=backend)

    def choose_micro_batch(self) -> None:
        """Settle the micro-batch size and the accumulation, and log them in one line: trainer.micro_batch_size if
        it is a number; with auto, the size of the checkpoint resumed from (if it still divides the batch over
        this many ranks), else the largest that fits (`find_micro_batch`)."""
        tcfg, world_size = self.tcfg, self.dist.world_size
        sequences = tcfg.total_batch_tokens // (self.mcfg.block_size * world_size)  # per rank and step
        if not tcfg.auto_micro_batch:
            how = "trainer.micro_batch_size"
        elif self.resumed_micro_batch and sequences % self.resumed_micro_batch == 0:
            self.micro_batch_size, how = self.resumed_micro_batch, "auto: the size the resumed checkpoint ran with"
        else:
            if self.resumed_micro_batch:
                log.warning("the checkpoint ran micro-batches of %d sequences, which do not divide the %d per rank "
                            "and step over %d ranks: searching again", self.resumed_micro_batch, sequences,
                            world_size)
            self.micro_batch_size, how = self.find_micro_batch(sequences)
        self.grad_accum = self.accumulation(self.micro_batch_size)
        check_batch_split(tcfg.total_batch_tokens, self.micro_batch_size, self.mcfg.block_size, world_size)
        self.loader.batch_size = self.micro_batch_size
        if self.dist.is_main:
            log.info("micro_batch_size %d x grad_accum %d x world_size %d x block_size %d = %d tokens per step (%s)",
                     self.micro_batch_size, self.grad_accum, world_size, self.mcfg.block_size,
                     tcfg.total_batch_tokens, how)

    def find_micro_batch(self, sequences: int) -> tuple[int, str]:
        """The largest of `micro_batch_candidates(sequences)` whose first step fits on every rank, and how it was
        found; MicroBatchDoesNotFit if not even 1 does."""
        too_big = []
        for size in micro_batch_candidates(sequences):
            if not any_rank_out_of_memory(not self.fits(size), self.dist, self.device):
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)  # the record's peak is training's, not the search's
                tried = f"; {', '.join(map(str, too_big))} ran out of memory" if too_big else ""
                return size, f"auto: the largest that fits{tried}"
            too_big.append(size)
            if self.dist.is_main and size > 1:
                log.warning("trainer.micro_batch_size=auto: micro-batch %d ran out of memory on %s%s; trying %d", size,
                            self.device, " or another rank" if self.dist.enabled else "", size // 2)
            if self.tcfg.compile:
                torch._dynamo.reset()  # the next size compiles afresh, static as a run with it fixed, not dynamic
        ranks = f" on at least one of the {self.dist.world_size} ranks" if self.dist.enabled else ""
        raise MicroBatchDoesNotFit(
            f"trainer.micro_batch_size=auto: not even a micro-batch of 1 sequence ({self.mcfg.block_size} tokens) fits "
            f"in the memory of {self.device}{ranks}: use a smaller model (model.n_layer, model.n_embd) or "
            f"model.block_size, or a device with more free memory")

    def fits(self, size: int) -> bool:
        """Whether the first step's forward and backward passes fit in memory at micro-batch `size` on this rank.
        The loader, the RNG and the gradients are put back as they were and the memory is freed, so the first step
        then runs exactly as it does with the chosen size fixed."""
        loader_state, rng = self.loader.state_dict(), rng_state()
        self.loader.batch_size = size
        try:
            self.try_first_step(size)
            fitted = True
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            fitted = False
        # the exception is gone with its except clause, and so are the frames that held the activations
        self.model.zero_grad(set_to_none=True)
        self.loader.load_state_dict(loader_state)
        restore_rng_state(rng)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return fitted

    def try_first_step(self, size: int) -> None:
        """The forward and backward passes of the first step's first two micro-batches at `size` (from the second
        one on, the gradients are resident during a forward: a step peaks there), with the memory AdamW's moments
        take from the first update on held, so that a size that fits the first step fits every step. Through the
        model without its DDP wrapper: the wrapper's collectives (buffer broadcast, gradient all-reduce) would leave
        the ranks out of step when one fails part-way; the ranks agree on the outcome afterwards."""
        model = self.train_model.module if isinstance(self.train_model, DistributedDataParallel) else self.train_model
        accum = self.accumulation(size)
        moments = optimizer_state_reserve(self.optimizer, self.device)  # noqa: F841 - held while the passes run
        for _ in range(min(accum, 2)):
            x, y = (t.to(self.device, non_blocking=True) for t in self.loader.next_batch())
            with self.autocast():
                _, loss = model(x, y)
            (loss / accum).backward()

    def accumulation(self, micro_batch_size: int) -> int:
        """Micro-batches per rank and step at `micro_batch_size`."""
        return self.tcfg.total_batch_tokens // (micro_batch_size * self.mcfg.block_size * self.dist.world_size)

    def fail_setup(self, err: BaseException) -> None:
        """Setup raised: rank 0's summary says so (status failed, or interrupted by a second Ctrl-C), over what an
        earlier attempt wrote. Bad input on a run dir without a record writes nothing: src/train.py then removes
        the run dir and reports one line."""
        if not self.dist.is_main or (isinstance(err, BAD_INPUT) and not self.record.has_record()):
            return
        if isinstance(err, KeyboardInterrupt):
            status, error, stopped_by = "interrupted", self.second_sigint(), signal.SIGINT.name
        else:
            status, error, stopped_by = "failed", error_line(err), None
        previous = self.record.read_summary()
        known = {k: v for k, v in self.summary_base().items() if v is not None or k not in previous}
        self.record.update_summary(**known, status=status, error=error, stopped_by=stopped_by,
                                   **{STEP: previous.get(STEP, self.step)})
        self.logger.finish(1)

    # ------------------------------------------------------------------------------------------ per step
    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over grad_accum micro-batches; returns (loss, grad norm, lr). A non-finite loss or
        gradient norm raises TrainingDiverged before the update."""
        t0 = time.perf_counter()
        lr = lr_at(self.step, self.tcfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = (t.to(self.device, non_blocking=True) for t in self.loader.next_batch())
            sync = micro == self.grad_accum - 1 or not self.dist.enabled
            with (contextlib.nullcontext() if sync else self.train_model.no_sync()), self.autocast():
                _, loss = self.train_model(x, y)
                loss = loss / self.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        loss_value = all_reduce_mean(loss_sum, self.dist).item()
        max_norm = self.tcfg.grad_clip if self.tcfg.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
        if not (math.isfinite(loss_value) and math.isfinite(norm)):
            # a finite loss can come with an infinite gradient: applying it would make every weight NaN
            raise TrainingDiverged(f"training diverged at step {self.step + 1} (loss {loss_value:.4g}, grad norm "
                                   f"{norm:.4g}); the update was not applied; {self.kept_checkpoint()}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step += 1
        self.last_loss = loss_value
        self.window_tokens += self.tcfg.total_batch_tokens
        self.window_time += time.perf_counter() - t0
        return loss_value, norm, lr

    def log(self, loss: float, norm: float, lr: float) -> None:
        """A training row (metrics.jsonl and the tracker) with the throughput since the previous one; the
        summary's step. Rank 0 only."""
        batch_tokens = self.tcfg.total_batch_tokens
        tokens_per_s = self.window_tokens / self.window_time
        row = {
            STEP: self.step, TOKENS: self.step * batch_tokens, TRAIN_LOSS: loss, TRAIN_LR: lr, TRAIN_GRAD_NORM: norm,
            TOKENS_PER_S: tokens_per_s, MFU: tokens_per_s * self.flops_token / self.peak if self.peak else None,
            STEP_TIME_MS: 1000 * self.window_time / (self.window_tokens / batch_tokens),
            PEAK_MEM: peak_memory_mb(self.device), ELAPSED: self.elapsed(),
        }
        self.record.log(row)
        self.logger.log(row, self.step)
        self.record.update_summary(**{STEP: self.step, TOKENS: row[TOKENS], ELAPSED: row[ELAPSED]})
        self.window_tokens, self.window_time = 0, 0.0

    def evaluate(self, final: bool = False) -> dict:
        """The evaluation suite at the current step (every rank: it all-reduces); rank 0 logs an evaluation row
        and, for the `final` one, writes eval_details.json."""
        evaluation = evaluate_suite(self.model, self.ecfg, self.shard_dir, self.device, self.autocast, details=final)
        if self.dist.is_main:
            if evaluation.details is not None:
                self.record.save_details(evaluation.details)
            self.record.log({STEP: self.step, **evaluation.metrics})
            self.logger.log(evaluation.metrics, self.step)
        return evaluation.metrics

    def checkpoint(self) -> None:
        """An atomic checkpoint of the current step (rank 0), unless it is step 0 or already written."""
        if self.dist.is_main and self.step not in (0, self.last_checkpoint):
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "loader": self.loader.state_dict(),
                     "rng": rng_state(), "elapsed_s": self.elapsed(), "num_threads": torch.get_num_threads(),
                     "micro_batch_size": self.micro_batch_size, "grad_accum": self.grad_accum}
            try:
                save_checkpoint(self.record.checkpoint_dir, self.step, self.model, dataclasses.asdict(self.mcfg),
                                state, self.tcfg.keep_last)
            except NonFiniteCheckpoint as err:
                raise TrainingDiverged(f"training diverged by step {self.step} ({err}); {self.kept_checkpoint()}"
                                       ) from None
        self.last_checkpoint = self.step

    def stop_signal(self) -> signal.Signals | None:
        """The stop signal received, if any; under DDP the highest of any rank, so every rank takes the same branch."""
        if not self.dist.enabled:
            return self.stop.requested
        flag = torch.tensor(float(self.stop.requested or 0), device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return signal.Signals(int(flag.item())) if flag.item() else None

    # ------------------------------------------------------------------------------------------ finish
    def finish(self, status: str, error: str | None, stopped_by: signal.Signals | None) -> dict:
        """The summary of this attempt: rank 0 writes it (record and tracker) and closes the tracker; the other
        ranks return the part they know."""
        summary = {**self.summary_base(), "status": status, STEP: self.step, "error": error,
                   "stopped_by": stopped_by.name if stopped_by else None}
        if self.dist.is_main:
            summary = self.record.update_summary(
                **summary, **{TOKENS: self.step * self.tcfg.total_batch_tokens, TRAIN_LOSS: self.last_loss},
                **self.eval_metrics, **{ELAPSED: self.elapsed()}, **_perf_summary(self.record),
            )
            self.logger.summary(summary)
            if status == "finished":
                self.logger.final_report(self.record.run_dir)  # W&B: the report's figures, the eval table
            self.logger.finish(0 if status == "finished" else 1)
        return summary

    def summary_base(self) -> dict:
        """What the summary says about the run itself (num_params None until the model is built)."""
        return {
            "run_name": self.name, "pe": self.mcfg.pe["name"], "attention": self.mcfg.attention["name"],
            "sweep": self.cfg.get("sweep_name"), "seed": self.tcfg.seed, "num_params": self.num_params,
            "device": str(self.device), "world_size": self.dist.world_size, "max_steps": self.tcfg.max_steps,
            "micro_batch_size": self.micro_batch_size, "grad_accum": self.grad_accum,  # None until chosen (auto)
            "attention_backend": self.attention_backend,  # None until setup has built the model
            "wandb_run_id": self.logger.run_id, FINGERPRINT_KEY: config_fingerprint(self.resolved), **provenance(),
        }

    def elapsed(self) -> float:
        """Wall-clock seconds over all attempts of this run."""
        return self.elapsed_before + time.perf_counter() - self.started

    def kept_checkpoint(self) -> str:
        kept = list_checkpoints(self.record.checkpoint_dir)
        where = f"the last finite checkpoint, {kept[-1]}, is kept" if kept else "no checkpoint was written"
        return f"{where} (lower trainer.lr or raise trainer.warmup_steps)"

    def second_sigint(self) -> str:
        return f"stopped by a second SIGINT at step {self.step}; resumes from the last checkpoint"


def error_line(err: BaseException) -> str:
    """The summary's `error` for an exception."""
    return f"{type(err).__name__}: {err}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    # numpy's state as tensors/ints so the training state loads with torch.load(weights_only=True).
    algorithm, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"algorithm": algorithm, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["algorithm"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_name_and_tags(cfg: DictConfig) -> tuple[str, list[str]]:
    pe, attention = cfg.model.pe.name, cfg.model.attention.name
    tags = [f"pe:{pe}", f"attention:{attention}", *cfg.logger.tags]
    if cfg.get("sweep_name"):
        tags.append(f"sweep:{cfg.sweep_name}")
    return cfg.run_name, tags


def logged_evaluation(record: RunRecord, step: int) -> dict:
    """The metrics of an evaluation row already logged at `step`, or {}."""
    rows = [r for r in record.read_metrics() if r.get(STEP) == step and VAL_LOSS in r]
    return {k: v for k, v in rows[-1].items() if k != STEP} if rows else {}


def match_thread_count(saved: int | None, device: torch.device) -> None:
    """On CPU the reductions (layer norm backward, MKL matmuls, sums) split their work by the intra-op thread
    count, so a step at 1 thread differs from one at 2 in the last bit: resume at the checkpoint's count."""
    if device.type == "cpu" and saved and saved != torch.get_num_threads():
        log.warning("the checkpoint was written with %d intra-op threads, this process has %d: using %d, so that the "
                    "resumed run reproduces the uninterrupted one", saved, torch.get_num_threads(), saved)
        torch.set_num_threads(saved)


def _perf_summary(record: RunRecord) -> dict:
    """Median throughput / MFU and the peak memory over the logged training rows."""
    rows = [r for r in record.read_metrics() if TOKENS_PER_S in r]
    if not rows:
        return {}
    return {TOKENS_PER_S: _median(rows, TOKENS_PER_S), MFU: _median(rows, MFU),
            PEAK_MEM: max(r[PEAK_MEM] for r in rows)}


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median_high(values) if values else None
