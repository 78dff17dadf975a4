"""Training throughput and memory of every PE x attention, side by side with Hugging Face's GPT-2.

    python -m src.benchmark --quick                      # CPU: tiny model, every PE x attention, ~minutes
    python -m src.benchmark --pes learned alibi --attentions flash --context 1024 --compile on

For every cell (context length x batch size x compile mode) the peer, `GPT2LMHeadModel` with SDPA
attention at the same sizes, batch and dtype, stays resident, and each of our combinations is timed in
rounds alternating with it (ours first in even rounds, the peer first in odd ones). Machines are noisy,
shared CPUs above all; a ratio of two measurements taken seconds apart is far steadier than two absolute
numbers taken minutes apart, so the headline figure `vs_peer` is the median over rounds of that ratio.
Every PE and attention is built at block_size = the longest context measured, with the settings its schema's
`for_context` hook gives for that context (Linformer's chunk_size and k); bench.json's meta records them.
Outputs: <out>/bench.json, bench.md and bench.png (src/benchmark/report.py); docs/PERFORMANCE.md explains them.
`python -m src.benchmark.targets <bench.json ...>` checks them against the performance targets.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch

from src.benchmark import report
from src.benchmark.memory import memory_method
from src.benchmark.peer import PEER_NAME, PeerGPT2
from src.benchmark.step import TrainStep
from src.model import build_model, model_config
from src.model.attention import ATTENTION_REGISTRY
from src.model.pe import PE_REGISTRY
from src.training.flops import flops_per_token, peak_flops

PES = PE_REGISTRY.names()  # every registered PE and attention: a new one is benchmarked with no change here
ATTENTIONS = ATTENTION_REGISTRY.names()

# Defaults: GPT-2 124M on a GPU, or (--quick) a model small enough for a 2-core CPU. Flags override either.
PRESETS = {
    "full": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, context=[256, 512, 1024, 2048, 4096, 8192],
                 batch=[8], compile="both", dtype="bfloat16", repeats=5, steps=10, warmup=5, threads=None),
    "quick": dict(n_layer=2, n_head=4, n_embd=128, vocab_size=50304, context=[64, 128, 256], batch=[2],
                  compile="off", dtype="float32", repeats=3, steps=1, warmup=1, threads=1),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m src.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized defaults (see PRESETS)")
    p.add_argument("--pes", nargs="+", choices=PES, default=PES)
    p.add_argument("--attentions", nargs="+", choices=ATTENTIONS, default=ATTENTIONS)
    p.add_argument("--context", nargs="+", type=int, help="context lengths T")
    p.add_argument("--batch", nargs="+", type=int, help="batch sizes B (sequences per step)")
    p.add_argument("--compile", choices=["on", "off", "both"], help="torch.compile both models")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="bfloat16: autocast, as the trainer")
    p.add_argument("--repeats", type=int, help="timed rounds per combination (medians are over these)")
    p.add_argument("--steps", type=int, help="back-to-back training steps per timed round")
    p.add_argument("--warmup", type=int, help="untimed steps first (compilation happens here)")
    for key in ("n_layer", "n_head", "n_embd", "vocab_size"):
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int)
    p.add_argument("--threads", type=int, help="torch.set_num_threads; --quick: 1, see docs/PERFORMANCE.md")
    p.add_argument("--profile", action="store_true",
                   help="also profile 2 steps of each combination: <out>/profiles/<cell>-<combo>.txt (+ .trace.json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = p.parse_args(argv)
    for key, default in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    return args


def model_cfg(args: argparse.Namespace, pe: str, attention: str) -> dict:
    """Our model at the benchmark's sizes, its PE and attention sized for the longest context measured."""
    block_size = max(args.context)
    return dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=block_size,
                vocab_size=args.vocab_size, dropout=0.0, bias=True, pe=PE_REGISTRY.for_context(pe, block_size),
                attention=ATTENTION_REGISTRY.for_context(attention, block_size))


def component_settings(args: argparse.Namespace) -> dict:
    """What `model_cfg` sets beyond the schema defaults, per requested PE and attention, for bench.json's meta:
    {"block_size": T, "pe": {name: {...}}, "attention": {"linformer": {"chunk_size": 64, "k": 16}, ...}}."""
    block_size = max(args.context)

    def overrides(registry, names: list[str]) -> dict:
        return {name: {k: v for k, v in registry.for_context(name, block_size).items() if k != "name"}
                for name in names}

    return dict(block_size=block_size, pe=overrides(PE_REGISTRY, args.pes),
                attention=overrides(ATTENTION_REGISTRY, args.attentions))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_memory(step: TrainStep) -> dict:
    """One more, untimed step for its peak memory, plus the resident weights and AdamW state."""
    return dict(step_mem_mib=step.step_memory_mib(), state_mem_mib=step.state_memory_mib())


def result_row(model: str, pe: str, attention: str, cell: dict, tokens_per_step: int, seconds: list[float],
               peer_seconds: list[float], memory: dict | None, flops: float | None, peak: float | None,
               error: str | None) -> dict:
    """One JSON row; `peer_seconds[i]` is the peer's round next to `seconds[i]` (empty for the peer itself)."""
    tps = [tokens_per_step / s for s in seconds]
    median_tps = statistics.median(tps) if tps else None
    return dict(
        model=model, pe=pe, attention=attention, **cell,
        tokens_per_s=median_tps,
        step_ms=statistics.median(seconds) * 1e3 if seconds else None,
        tokens_per_s_rounds=tps,
        vs_peer=statistics.median(p / s for s, p in zip(seconds, peer_seconds)) if peer_seconds else None,
        mfu=flops * median_tps / peak if peak and median_tps else None,
        **(memory or dict(step_mem_mib=None, state_mem_mib=None)),
        error=error,
    )


def profile_path(out: Path, cell: dict, combo: str) -> Path:
    compiled = "compiled" if cell["compile"] else "eager"
    path = out / "profiles" / f"T{cell['context']}-B{cell['batch']}-{compiled}-{combo}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def measure_cell(args, device: torch.device, context: int, batch: int, compile: bool) -> list[dict]:
    """All requested PE x attention combinations plus the peer at one (context, batch, compile)."""
    cell = dict(context=context, batch=batch, compile=compile, dtype=args.dtype)
    peak = peak_flops(device)

    def train_step(model: torch.nn.Module) -> TrainStep:
        return TrainStep(model, batch, context, args.vocab_size, device, args.dtype, compile)

    peer, peer_error = None, None
    try:
        peer = train_step(PeerGPT2(model_config(model_cfg(args, *report.REFERENCE))))
        peer.warm_up(args.warmup)
    except Exception as e:  # an OOM at a long context must not cost the rest of the grid
        peer, peer_error = None, f"{type(e).__name__}: {e}"
    all_peer_seconds: list[float] = []
    rows = []
    pe_width, attention_width = max(map(len, args.pes)), max(map(len, args.attentions))  # aligned progress lines
    for pe in args.pes:
        for attention in args.attentions:
            step, seconds, peer_seconds, memory, error = None, [], [], None, None
            try:
                step = train_step(build_model(model_cfg(args, pe, attention)))
                step.warm_up(args.warmup)
                for r in range(args.repeats):
                    # Alternate who goes first so that neither always runs right after the other's allocations.
                    if peer and r % 2:
                        peer_seconds.append(peer.timed(args.steps))
                    seconds.append(step.timed(args.steps))
                    if peer and not r % 2:
                        peer_seconds.append(peer.timed(args.steps))
                memory = measure_memory(step)
                if args.profile:
                    step.profile(2, profile_path(args.out, cell, f"{pe}+{attention}"))
            except Exception as e:
                seconds, peer_seconds, error = [], [], f"{type(e).__name__}: {e}"
            flops = flops_per_token(step.model, context) if step else None
            rows.append(result_row("pegrid", pe, attention, cell, batch * context, seconds, peer_seconds, memory,
                                   flops, peak, error))
            all_peer_seconds += peer_seconds
            print(f"  {pe:>{pe_width}}+{attention:<{attention_width}} "
                  f"{report.fmt(rows[-1]['tokens_per_s'], ',.0f'):>9} tok/s  "
                  f"x{report.fmt(rows[-1]['vs_peer'], '.3f')} peer  {error or ''}", flush=True)
            del step
            free_memory(device)
    peer_memory, flops = None, None
    if peer:
        flops = peer.model.flops_per_token(context)
        try:
            peer_memory = measure_memory(peer)
            if args.profile:
                peer.profile(2, profile_path(args.out, cell, PEER_NAME))
        except Exception as e:
            peer_error = f"{type(e).__name__}: {e}"
    rows.append(result_row(PEER_NAME, "learned", "sdpa", cell, batch * context, all_peer_seconds, [], peer_memory,
                           flops, peak, peer_error))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        # On a shared CPU a descheduled OpenMP worker stalls every op at its barrier: 2 threads on 2 busy
        # cores gave 10-100x step-time outliers here, 1 thread a steady time.
        torch.set_num_threads(args.threads)
    # Every combination compiles GPT.forward anew (different PE modules fail the guards); dynamo's default
    # limit of 8 recompilations would silently fall back to eager for the rest of the grid.
    torch._dynamo.config.recompile_limit = max(64, 4 * len(args.pes) * len(args.attentions))
    import transformers

    meta = dict(
        command="python -m src.benchmark " + shlex.join(sys.argv[1:] if argv is None else argv),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        device_type=device.type,
        n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, vocab_size=args.vocab_size,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        dtype=args.dtype,
        model=f"n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd} vocab_size={args.vocab_size}",
        components=component_settings(args),
        step="forward + backward + AdamW step (trainer's optimizer, zero_grad(set_to_none)); no grad clipping",
        warmup=args.warmup, repeats=args.repeats, steps=args.steps,
        memory_method=memory_method(device),
        load_avg_before=os.getloadavg(),
    )
    compile_modes = {"on": [True], "off": [False], "both": [False, True]}[args.compile]
    results = []
    for compile in compile_modes:
        for context in args.context:
            for batch in args.batch:
                print(f"compile={'on' if compile else 'off'} T={context} B={batch}", flush=True)
                results += measure_cell(args, device, context, batch, compile)
    meta["load_avg_after"] = os.getloadavg()
    paths = report.write(dict(meta=meta, results=results), args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 1 if any(r["error"] for r in results) else 0

