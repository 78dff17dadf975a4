"""The training loop: one run of one PE x attention combination, from config to run record.

`train(cfg, run_dir)` is what `python -m src.train` calls inside Hydra's run dir; tests call it directly
with a config from Hydra's compose API.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from src.eval.suite import eval_config, run_evaluation
from src.metrics import VAL_LOSS
from src.model import build_model, model_config
from src.preflight import check_inputs
from src.provenance import provenance
from src.run_record import RunRecord
from src.structured import to_dataclass
from src.training.config import LoggerConfig, TrainerConfig
from src.training.distributed import DistContext, all_reduce_mean, init_distributed, shutdown_distributed
from src.training.fingerprint import FINGERPRINT_KEY, config_fingerprint
from src.training.flops import flops_per_token, peak_flops
from src.training.loggers import NoLogger, build_logger
from src.training.optim import build_optimizer, lr_at
from src.training.run_lock import RunLock
from src.training.stop_signals import StopSignals

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    pass


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


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train per `cfg` (the composed train.yaml), write the run record into run_dir, return the summary.

    The run dir is locked for the run's duration (one process per record). A stop signal (SIGINT, SIGTERM,
    SLURM's USR2) checkpoints the current step and returns a summary with status `interrupted`.
    """
    check_inputs(cfg, run_dir)  # bad input fails here, before anything is written
    tcfg = to_dataclass(TrainerConfig, cfg.trainer)
    lcfg = to_dataclass(LoggerConfig, cfg.logger)
    mcfg = model_config(cfg.model)
    dist_ctx, device = init_distributed(tcfg.device)
    record = RunRecord(Path(run_dir))
    record.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with RunLock(record.run_dir) if dist_ctx.is_main else contextlib.nullcontext(), StopSignals() as stop:
            summary = _train(cfg, tcfg, lcfg, mcfg, dist_ctx, device, record, stop)
    finally:
        shutdown_distributed()
    if stop.requested:
        stop.chain()  # under submitit, USR2 now requeues the job, which resumes from the checkpoint just written
    return summary


def _train(cfg, tcfg: TrainerConfig, lcfg: LoggerConfig, mcfg, dist_ctx: DistContext, device, record: RunRecord,
           stop: StopSignals):
    # check_inputs made sure the micro-batches divide total_batch_tokens
    grad_accum = tcfg.total_batch_tokens // (tcfg.micro_batch_size * mcfg.block_size * dist_ctx.world_size)
    seed_everything(tcfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if tcfg.resume == "never" and dist_ctx.is_main and record.has_record():
        moved = record.move_aside()  # a fresh start never appends to, or resumes, the old record
        log.warning("trainer.resume=never: the existing run record in %s was moved to %s", record.run_dir, moved)

    ecfg = eval_config(cfg.eval)
    if ecfg.hellaswag.enabled and dist_ctx.is_main:
        ensure_hellaswag(ecfg.hellaswag)  # offline or a wrong path: fail now, not at the first evaluation
    shard_dir = ensure_prepared(cfg.data) if dist_ctx.is_main else None
    if dist_ctx.enabled:  # rank 0 prepares; the others wait, then find the finished shards
        torch.distributed.barrier()
        shard_dir = ensure_prepared(cfg.data)
    loader = TokenLoader(shard_dir, "train", tcfg.micro_batch_size, mcfg.block_size, tcfg.seed,
                         dist_ctx.rank, dist_ctx.world_size)

    model = build_model(mcfg).to(device)
    optimizer = build_optimizer(model, tcfg, device.type)
    start_step, elapsed_before = 0, 0.0
    if tcfg.resume == "auto":
        found = latest_valid_checkpoint(record.checkpoint_dir, model)
        if found is not None:
            ckpt_dir, state = found
            optimizer.load_state_dict(state["optimizer"])
            loader.load_state_dict(state["loader"])
            restore_rng_state(state["rng"])
            start_step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
            match_thread_count(state.get("num_threads"), device)
            log.info("resumed from %s (step %d)", ckpt_dir, start_step)
    previous = record.read_summary()
    if start_step >= tcfg.max_steps and previous.get("status") == "finished":
        log.info("%s already finished (step %d); nothing to do", record.run_dir, start_step)
        return previous
    if dist_ctx.is_main:
        record.truncate_after(start_step)  # also from scratch: rows of an attempt without a valid checkpoint go
        record.save_config(cfg)
    train_model = torch.compile(model) if tcfg.compile else model
    if dist_ctx.enabled:
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = autocast_for(device, tcfg.dtype)

    name, tags = run_name_and_tags(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger = build_logger(lcfg, record.run_dir, name, resolved, tags) if dist_ctx.is_main else NoLogger()
    flops_token = flops_per_token(model, mcfg.block_size)
    peak = peak_flops(device)
    summary_base = {
        "run_name": name, "pe": mcfg.pe["name"], "attention": mcfg.attention["name"], "sweep": cfg.get("sweep_name"),
        "seed": tcfg.seed, "num_params": sum(p.numel() for p in model.parameters()), "device": str(device),
        "world_size": dist_ctx.world_size, "max_steps": tcfg.max_steps, "wandb_run_id": logger.run_id,
        FINGERPRINT_KEY: config_fingerprint(resolved), **provenance(),
    }
    if dist_ctx.is_main:
        record.update_summary(**summary_base, status="running", error=None, stopped_by=None, step=start_step)

    def evaluate(step: int) -> dict:
        metrics = run_evaluation(model, ecfg, shard_dir, device, autocast)
        if dist_ctx.is_main:
            record.log({"step": step, **metrics})
            logger.log(metrics, step)
        return metrics

    def elapsed() -> float:  # wall-clock seconds over all attempts of this run
        return elapsed_before + time.perf_counter() - started

    model_config_dict = dataclasses.asdict(mcfg)
    last_checkpoint = start_step if start_step else None

    def checkpoint(step: int) -> None:
        nonlocal last_checkpoint
        if dist_ctx.is_main and step not in (0, last_checkpoint):
            state = {"step": step, "optimizer": optimizer.state_dict(), "loader": loader.state_dict(),
                     "rng": rng_state(), "elapsed_s": elapsed(), "num_threads": torch.get_num_threads()}
            try:
                save_checkpoint(record.checkpoint_dir, step, model, model_config_dict, state, tcfg.keep_last)
            except NonFiniteCheckpoint as err:
                raise TrainingDiverged(f"training diverged by step {step} ({err}); {kept_checkpoint()}") from None
        last_checkpoint = step

    def kept_checkpoint() -> str:
        kept = list_checkpoints(record.checkpoint_dir)
        where = f"the last finite checkpoint, {kept[-1]}, is kept" if kept else "no checkpoint was written"
        return f"{where} (lower trainer.lr or raise trainer.warmup_steps)"

    def stop_signal() -> signal.Signals | None:  # every rank must take the same branch: the highest signal of any
        if not dist_ctx.enabled:
            return stop.requested
        flag = torch.tensor(float(stop.requested or 0), device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return signal.Signals(int(flag.item())) if flag.item() else None

    step, last_loss, eval_metrics = start_step, float("nan"), {}
    # any other BaseException (SystemExit) leaves the run "running": whoever raised it resumes it
    status, error, stopped_by = "running", None, None
    started = time.perf_counter()
    bar = tqdm(total=tcfg.max_steps, initial=start_step, desc=name, disable=not (tcfg.progress and dist_ctx.is_main),
               dynamic_ncols=True)
    try:
        window_tokens, window_time = 0, 0.0
        while step < tcfg.max_steps and stop_signal() is None:
            t0 = time.perf_counter()
            lr = lr_at(step, tcfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(grad_accum):
                x, y = (t.to(device, non_blocking=True) for t in loader.next_batch())
                sync = micro == grad_accum - 1 or not dist_ctx.enabled
                with (contextlib.nullcontext() if sync else train_model.no_sync()), autocast():
                    _, loss = train_model(x, y)
                    loss = loss / grad_accum
                loss.backward()
                loss_sum += loss.detach()
            loss_value = all_reduce_mean(loss_sum, dist_ctx).item()
            max_norm = tcfg.grad_clip if tcfg.grad_clip > 0 else math.inf
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
            if not (math.isfinite(loss_value) and math.isfinite(norm)):
                # a finite loss can come with an infinite gradient: applying it would make every weight NaN
                raise TrainingDiverged(f"training diverged at step {step + 1} (loss {loss_value:.4g}, grad norm "
                                       f"{norm:.4g}); the update was not applied; {kept_checkpoint()}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            step += 1
            last_loss = loss_value
            window_tokens += tcfg.total_batch_tokens
            window_time += dt
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
            if dist_ctx.is_main and (step % tcfg.log_every == 0 or step == tcfg.max_steps):
                tokens_per_s = window_tokens / window_time
                row = {
                    "step": step, "tokens": step * tcfg.total_batch_tokens, "train/loss": loss_value, "train/lr": lr,
                    "train/grad_norm": norm, "perf/tokens_per_s": tokens_per_s,
                    "perf/mfu": tokens_per_s * flops_token / peak if peak else None,
                    "perf/step_time_ms": 1000 * window_time / (window_tokens / tcfg.total_batch_tokens),
                    "perf/peak_mem_mb": peak_memory_mb(device),
                    "time/elapsed_s": elapsed(),
                }
                record.log(row)
                logger.log(row, step)
                record.update_summary(step=step, tokens=row["tokens"], **{"time/elapsed_s": row["time/elapsed_s"]})
                window_tokens, window_time = 0, 0.0
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.max_steps:
                eval_metrics = evaluate(step)
            if tcfg.ckpt_every and step % tcfg.ckpt_every == 0 and step < tcfg.max_steps:
                checkpoint(step)
        bar.close()
        checkpoint(step)  # before the final evaluation: an evaluation that crashes must not cost training steps
        stopped_by = stop_signal()
        if stopped_by:
            status = "interrupted"
            saved = "checkpointed" if step else "nothing trained yet"
            error = f"stopped by {stopped_by.name} at step {step}; {saved}: rerun the same command to resume"
        else:
            # resumed after the final evaluation was logged but before the summary was written: reuse it
            eval_metrics = logged_evaluation(record, step) or evaluate(step)
            status = "finished"
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of this step, the previous one is kept
        stopped_by = signal.SIGINT
        status, error = "interrupted", f"stopped by a second SIGINT at step {step}; resumes from the last checkpoint"
        raise
    except Exception as err:
        status, error = "failed", f"{type(err).__name__}: {err}"
        raise
    finally:
        bar.close()
        summary = dict(summary_base, status=status, step=step, error=error,  # what non-main ranks return
                       stopped_by=stopped_by.name if stopped_by else None)
        if dist_ctx.is_main:
            summary = record.update_summary(
                **summary_base, status=status, error=error, step=step, tokens=step * tcfg.total_batch_tokens,
                stopped_by=stopped_by.name if stopped_by else None,
                **{"train/loss": last_loss}, **eval_metrics, **{"time/elapsed_s": elapsed()},
                **_perf_summary(record),
            )
            logger.summary(summary)
            logger.finish(0 if status == "finished" else 1)
    return summary


def logged_evaluation(record: RunRecord, step: int) -> dict:
    """The metrics of an evaluation row already logged at `step`, or {}."""
    rows = [r for r in record.read_metrics() if r.get("step") == step and VAL_LOSS in r]
    return {k: v for k, v in rows[-1].items() if k != "step"} if rows else {}


def match_thread_count(saved: int | None, device: torch.device) -> None:
    """On CPU the reductions (layer norm backward, MKL matmuls, sums) split their work by the intra-op thread
    count, so a step at 1 thread differs from one at 2 in the last bit: resume at the checkpoint's count."""
    if device.type == "cpu" and saved and saved != torch.get_num_threads():
        log.warning("the checkpoint was written with %d intra-op threads, this process has %d: using %d, so that the "
                    "resumed run reproduces the uninterrupted one", saved, torch.get_num_threads(), saved)
        torch.set_num_threads(saved)


def _perf_summary(record: RunRecord) -> dict:
    """Median throughput / MFU and the peak memory over the logged training rows."""
    rows = [r for r in record.read_metrics() if "perf/tokens_per_s" in r]
    if not rows:
        return {}

    def median(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median_high(values) if values else None
    return {"perf/tokens_per_s": median("perf/tokens_per_s"), "perf/mfu": median("perf/mfu"),
            "perf/peak_mem_mb": max(r["perf/peak_mem_mb"] for r in rows)}
