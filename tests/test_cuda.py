"""The CUDA path, for every registered PE x attention: the trainer's step (bf16 autocast, eager and compiled),
FlexAttention against the dense path (forward and parameter gradients), KV-cached decoding, HellaSwag scoring
and checkpoint -> resume; DDP over NCCL where there are two GPUs. Every test is marked `cuda` and skipped, with
the reason, without a GPU (`pytest -m cuda` runs them; `make gpu-check` runs them first, in 4 parallel shards).

Sizes: the tests' tiny models (2 layers, block_size 32) with n_embd 64, i.e. head_dim 16, wherever a backward
pass follows: compiled FlexAttention on CUDA refuses head dims below 16 (Inductor: "NYI: embedding dimension of
the query, key, and value must be at least 16"; tl.dot needs K >= 16), and `model=tiny` has head_dim 8.

Tolerances (norm-wise per tensor, ||got - want|| / ||want||), where no bit-exactness is to be had:
- FlexAttention vs dense, fp32 (TF32 off): <= 1e-4. Both compute the same softmax in fp32; only the
  accumulation order differs (online softmax in 128-blocks vs one pass): ~1e-6 expected.
- FlexAttention vs dense, bf16 autocast: flex's error against the fp32 dense reference must be at most
  2 x the dense bf16 path's error + 1e-2, for the logits and for every parameter gradient, and flex vs dense
  logits <= 2e-2. bf16 keeps 8 significant bits (unit roundoff u = 2^-8 = 3.9e-3); q, k, v, the attention
  output and (dense path) the bias and probabilities are rounded to bf16, so each path is a few u off the fp32
  result, more for small gradients that are sums of cancelling terms (KERPLE's per-head scalars). A correct
  kernel has the dense path's error budget; a wrong one (no bias, wrong mask, no gradient into a captured
  buffer) is O(1) off.
- Checkpoint -> resume (bf16): every train/loss and the final val/loss within 1e-3 relative of the
  uninterrupted run. CUDA's backward is not bit-reproducible (atomics: SDPA's dq, FIRE's index_put
  accumulate, FlexAttention's gradients into captured buffers), so two identical runs drift by ~1e-6..1e-4
  after a few steps; a resume that loses the data position or the optimizer state moves the loss by >= 5e-3.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import sys
import traceback

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from omegaconf import OmegaConf

from src.data import TokenLoader
from src.device import autocast_for
from src.eval.hellaswag import _batch, load_examples, predict, score_items
from src.model import ATTENTION_REGISTRY, PE_REGISTRY, build_model
from src.model.attention import attention_backend, flex_available
from src.training.trainer import train
from tests.conftest import ATTENTIONS, PES, sized_overrides, tiny_model_cfg
from tests.test_eval import gpt2_vocab_model, write_hellaswag
from tests.train_helpers import compose_train, next_batch_that_signals, record_rows, tiny_overrides, train_losses

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() "
                                 f"is False; torch {torch.__version__}, CUDA build {torch.version.cuda})")]

COMBOS = [(pe, attention) for pe in PES for attention in ATTENTIONS]
# trainer.compile=true for these only (a compile of the test model costs ~10 s): SDPA in the graph
# (learned+flash), FlexAttention's score_mod traced into the graph with a shared bias (alibi+flash) and with
# a captured table that needs a gradient (fire+flash), Linformer's mask_mod with a per-layer learnable bias
# (kerple+linformer), and the explicit softmax with RoPE's tables (rope+regular). sinusoidal and nope add
# nothing to compile (an embedding, nothing); every combination runs eager.
COMPILED_STEP_COMBOS = [combo for combo in [("learned", "flash"), ("alibi", "flash"), ("fire", "flash"),
                                            ("kerple", "linformer"), ("rope", "regular")] if combo in COMBOS]
N_EMBD = 64  # 4 heads of 16: the smallest head_dim compiled FlexAttention takes on CUDA
BLOCK = 32  # tiny_model_cfg's and model=tiny's context

FP32_FLEX_RTOL = 1e-4
BF16_LOGITS_RTOL = 2e-2
BF16_ERROR_FACTOR, BF16_ERROR_FLOOR = 2.0, 1e-2
RESUME_RTOL = 1e-3
KV_ATOL = 1e-4
HELLASWAG_BF16_RTOL = 1e-2


def combo_id(pe: str, attention: str) -> str:
    return f"{pe}-{attention}"


@pytest.fixture(autouse=True, scope="module")
def dynamo_limits():
    """Every model and every FlexAttention program (score_mod x mask_mod x dtype) is a recompile of the same
    frames; past dynamo's limit of 8 it would silently fall back to eager and test the wrong code. Raised, and
    made an error if it is still hit."""
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=1024, accumulated_recompile_limit=4096,
                                    fail_on_recompile_limit_hit=True):
        yield


@pytest.fixture
def exact_fp32():
    """fp32 as fp32: the trainer turns TF32 on for the process (setup), which would put ~1e-3 into fp32 matmuls."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture
def flex_calls(monkeypatch):
    """Counts calls of the FlexAttention path (`flex_attention_with_bias`) by every attention module that uses it."""
    import src.model.attention.flex as flex_module

    original, calls = flex_module.flex_attention_with_bias, {"n": 0}

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("src.model.") and getattr(module, "flex_attention_with_bias", None) is original:
            monkeypatch.setattr(module, "flex_attention_with_bias", counted)
    return calls


def has_bias(pe: str) -> bool:
    return PE_REGISTRY.entry(pe)[1].has_bias


def has_flex_path(attention: str) -> bool:
    return "use_flex" in {f.name for f in dataclasses.fields(ATTENTION_REGISTRY.entry(attention)[0])}


def trains_with_flex(pe: str, attention: str) -> bool:
    """Where training on CUDA must use FlexAttention (docs/ARCHITECTURE.md): a mechanism with `use_flex` with a bias
    PE, and Linformer with any PE; flash without a bias is SDPA's fused kernel."""
    return has_flex_path(attention) and (has_bias(pe) or attention != "flash")


def assert_flex_still_usable(dtype: torch.dtype) -> None:
    """FlexAttention's fallback (src/model/attention/flex.py) turns a failing flex call into the dense path for the
    rest of the process, with a warning: a test that compares the two must fail instead."""
    usable, why = flex_available(torch.device("cuda"), dtype)
    assert usable, f"FlexAttention fell back to the dense path on CUDA ({dtype}): {why}"


def cuda_overrides(data_dir, pe: str, attention: str, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    """tests/train_helpers.py's tiny run on CUDA (dtype auto = bf16 autocast there), head_dim 16, no extrapolation."""
    return tiny_overrides(data_dir, steps=steps, extra=[
        f"model/pe={pe}", f"model/attention={attention}", *sized_overrides(pe, attention, BLOCK),
        f"model.n_embd={N_EMBD}", "trainer.device=cuda", "eval.extrapolation.enabled=false", *extra])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------- (a) trainer step
STEP_CASES = ([pytest.param(pe, attention, False, id=f"{combo_id(pe, attention)}-eager") for pe, attention in COMBOS]
              + [pytest.param(pe, attention, True, id=f"{combo_id(pe, attention)}-compiled")
                 for pe, attention in COMPILED_STEP_COMBOS])


@pytest.mark.parametrize("pe,attention,compiled", STEP_CASES)
def test_one_trainer_step_on_cuda(pe, attention, compiled, data_dir, tmp_path, flex_calls):
    """`train()` itself, 1 step on CUDA with bf16 autocast (trainer.dtype=auto): a finite loss and a finite,
    non-zero gradient norm (the trainer raises TrainingDiverged before the update otherwise), and FlexAttention
    used wherever it applies: the summary's attention_backend (probed before the step, re-read after it) is
    "flex", and (eager) the flex path was called."""
    compile_override = f"trainer.compile={str(compiled).lower()}"
    cfg = compose_train(cuda_overrides(data_dir, pe, attention, steps=1, extra=(compile_override,)))
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "finished", summary.get("error")
    assert summary["device"].startswith("cuda") and summary["step"] == 1
    row = next(r for r in record_rows(tmp_path / "run") if "train/loss" in r)
    assert math.isfinite(row["train/loss"]), row
    assert math.isfinite(row["train/grad_norm"]) and row["train/grad_norm"] > 0, row
    assert row["perf/peak_mem_mb"] > 0, row
    assert summary["attention_backend"], summary
    if trains_with_flex(pe, attention):
        assert summary["attention_backend"] == "flex", summary["attention_backend"]
        assert compiled or flex_calls["n"] > 0, f"{pe}+{attention} trained on CUDA without calling FlexAttention"
        assert_flex_still_usable(torch.bfloat16)


# ---------------------------------------------------------------------------------------------- (b) flex vs dense
def forward_backward(model, x, y, autocast) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with autocast():
        logits, loss = model(x, y)
    loss.backward()
    return logits.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                                     if p.grad is not None}


def flex_and_dense_models(pe: str, attention: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    cfg = tiny_model_cfg(pe, attention, n_embd=N_EMBD)
    torch.manual_seed(0)
    flex = build_model(cfg | {"attention": {**cfg["attention"], "use_flex": True}}).cuda().train()
    dense = build_model(cfg | {"attention": {**cfg["attention"], "use_flex": False}}).cuda().train()
    dense.load_state_dict(flex.state_dict())
    return flex, dense


FLEX_CASES = [pytest.param(pe, attention, dtype, id=f"{combo_id(pe, attention)}-{dtype}",
                           marks=[] if has_flex_path(attention) else
                           pytest.mark.skip(reason=f"{attention} has no FlexAttention path (no use_flex setting)"))
              for pe, attention in COMBOS for dtype in ("fp32", "bf16")]


@pytest.mark.parametrize("pe,attention,dtype", FLEX_CASES)
def test_flex_matches_dense_on_cuda(pe, attention, dtype, flex_calls, exact_fp32):
    """The same weights with use_flex=true (compiled FlexAttention, training on CUDA) and use_flex=false (the
    dense path: SDPA with a float mask, Linformer's explicit path), as `attention_backend` names them: logits and
    every parameter gradient, within the module docstring's bounds; and no fallback to the dense path on the way."""
    flex, dense = flex_and_dense_models(pe, attention)
    compute_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    backends = attention_backend(flex, "cuda", compute_dtype), attention_backend(dense, "cuda", compute_dtype)
    if not trains_with_flex(pe, attention):
        assert backends[0] == backends[1] != "flex", backends
        pytest.skip(f"{pe}+{attention} trains without FlexAttention ({backends[0]}): nothing to compare")
    assert backends[0] == "flex", f"{pe}+{attention} would not train with FlexAttention on CUDA: {backends[0]} " \
                                  f"({flex_available(torch.device('cuda'), compute_dtype)[1]})"
    assert backends[1] != "flex", backends
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 97, (4, BLOCK + 1), generator=generator).cuda()
    x, y = idx[:, :-1], idx[:, 1:]
    fp32, bf16 = autocast_for(torch.device("cuda"), "float32"), autocast_for(torch.device("cuda"), "bfloat16")
    flex_logits, flex_grads = forward_backward(flex, x, y, fp32 if dtype == "fp32" else bf16)
    assert flex_calls["n"] > 0, f"{pe}+{attention}: the flex path was not called"
    assert_flex_still_usable(compute_dtype)
    trainable = {n for n, p in flex.named_parameters() if p.requires_grad}
    assert set(flex_grads) == trainable, f"parameters without a gradient: {sorted(trainable - set(flex_grads))}"
    ref_logits, ref_grads = forward_backward(dense, x, y, fp32)
    if dtype == "fp32":
        assert rel_err(flex_logits, ref_logits) <= FP32_FLEX_RTOL
        for name, grad in ref_grads.items():
            assert rel_err(flex_grads[name], grad) <= FP32_FLEX_RTOL, name
        return
    dense_logits, dense_grads = forward_backward(dense, x, y, bf16)
    assert rel_err(flex_logits, dense_logits) <= BF16_LOGITS_RTOL
    pairs = [("logits", flex_logits, dense_logits, ref_logits)]
    pairs += [(name, flex_grads[name], dense_grads[name], ref) for name, ref in ref_grads.items()]
    for name, got, dense_got, ref in pairs:
        flex_error, dense_error = rel_err(got, ref), rel_err(dense_got, ref)
        assert flex_error <= BF16_ERROR_FACTOR * dense_error + BF16_ERROR_FLOOR, (
            f"{name}: flex bf16 is {flex_error:.2e} off the fp32 reference, the dense bf16 path {dense_error:.2e}")


# ---------------------------------------------------------------------------------------------- (c) KV cache
@pytest.mark.parametrize("pe,attention", [pytest.param(*c, id=combo_id(*c)) for c in COMBOS])
def test_kv_cache_decoding_matches_full_forward_on_cuda(pe, attention, exact_fp32):
    """tests/test_model.py's decoding test on CUDA (fp32, TF32 off): prefill, then one token at a time, equals one
    full pass; and the CUDA full pass equals the CPU one. max |diff| <= 1e-4 on logits of O(1): one-row decode
    steps run other GEMM kernels (accumulation orders) than the full pass, ~1e-6 per matmul."""
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(pe, attention)).eval()
    length = model.max_context or 45  # past block_size where the PE allows, across several Linformer chunks
    idx = torch.randint(0, 97, (2, length))
    with torch.no_grad():
        cpu_full = model(idx)
        model.cuda()
        idx = idx.cuda()
        full = model(idx)
        cache = model.new_kv_cache()
        steps = [model(idx[:, :11], kv_cache=cache)]
        steps += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(11, length)]
    assert cache.length == length
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= KV_ATOL
    assert (full.cpu() - cpu_full).abs().max().item() <= KV_ATOL


# ---------------------------------------------------------------------------------------------- (d) HellaSwag
@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory):
    return write_hellaswag(tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl")


def ending_losses(model, examples, device, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """predict()'s summed and mean ending losses, [items, 4] (the numbers behind its argmins)."""
    tokens, mask = (t.to(device) for t in _batch(examples, model.max_context))
    with torch.no_grad(), autocast():
        logits = model(tokens)
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(),
                             reduction="none").view(len(tokens), -1)
    sums = (losses * mask[:, 1:]).sum(dim=1)
    return sums.view(-1, 4).cpu(), (sums / mask[:, 1:].sum(dim=1).clamp(min=1)).view(-1, 4).cpu()


def margins(losses: torch.Tensor) -> torch.Tensor:
    """Per item: second-lowest minus lowest loss (how far the pick is from a tie)."""
    low = losses.topk(2, dim=1, largest=False).values
    return low[:, 1] - low[:, 0]


@pytest.mark.parametrize("pe,attention", [pytest.param(*c, id=combo_id(*c)) for c in COMBOS])
def test_hellaswag_on_cuda_matches_cpu(pe, attention, hellaswag_file, exact_fp32):
    """The HellaSwag scorer on CUDA picks what it picks on CPU: fp32 (TF32 off) exactly, items and counts; with bf16
    autocast (how the trainer's evaluation runs it) the ending losses within 1e-2 relative to the largest (about
    2.5 u; bf16 autocast on CPU gives <= 2.0e-3 for every combination) and the same pick on every item whose CPU
    margin is more than twice the largest loss difference."""
    model = gpt2_vocab_model(pe, attention).eval()
    examples = load_examples(hellaswag_file)
    with torch.no_grad():
        cpu_pred = [p.tolist() for p in predict(model, examples)]
    cpu_counts = score_items(model, examples, batch_size=2)
    cpu_sums, cpu_means = ending_losses(model, examples, "cpu", autocast_for(torch.device("cpu"), "float32"))
    model.cuda()
    with torch.no_grad():
        assert [p.tolist() for p in predict(model, examples, "cuda")] == cpu_pred
    assert score_items(model, examples, batch_size=2, device="cuda") == cpu_counts

    bf16 = autocast_for(torch.device("cuda"), "bfloat16")
    with torch.no_grad():
        bf16_pred = [p.tolist() for p in predict(model, examples, "cuda", bf16)]
    bf16_sums, bf16_means = ending_losses(model, examples, "cuda", bf16)
    checked = 0
    for cpu_losses, bf16_losses, cpu_picks, bf16_picks in ((cpu_sums, bf16_sums, cpu_pred[0], bf16_pred[0]),
                                                           (cpu_means, bf16_means, cpu_pred[1], bf16_pred[1])):
        diff = (bf16_losses - cpu_losses).abs().max().item()
        assert diff <= HELLASWAG_BF16_RTOL * cpu_losses.abs().max().item(), diff
        clear = margins(cpu_losses) > 2 * diff
        assert [b for b, c in zip(bf16_picks, clear) if c] == [p for p, c in zip(cpu_picks, clear) if c]
        checked += int(clear.sum())
    assert checked > 0, "every item is a near-tie in bf16: the test model does not separate the endings"


# ---------------------------------------------------------------------------------------------- (e) resume
@pytest.mark.parametrize("pe,attention", [pytest.param(*c, id=combo_id(*c)) for c in COMBOS])
def test_resume_on_cuda_continues_the_same_losses(pe, attention, data_dir, tmp_path, monkeypatch):
    """6 steps straight vs stopped by SIGTERM in step 3 (checkpointed there) and resumed by a second train():
    the train/loss of every step and the final val/loss within 1e-3 relative (module docstring)."""
    overrides = cuda_overrides(data_dir, pe, attention, steps=6, extra=("trainer.ckpt_every=100",))
    straight = train(compose_train(overrides), tmp_path / "straight")
    run_dir = tmp_path / "stopped"
    with monkeypatch.context() as m:
        m.setattr(TokenLoader, "next_batch", next_batch_that_signals(3, signal.SIGTERM))  # 1 micro-batch a step
        stopped = train(compose_train(overrides), run_dir)
    assert stopped["status"] == "interrupted" and stopped["step"] == 3, stopped
    resumed = train(compose_train(overrides), run_dir)
    assert straight["status"] == resumed["status"] == "finished", (straight.get("error"), resumed.get("error"))
    assert resumed["attention_backend"] == straight["attention_backend"]
    assert resumed["micro_batch_size"] == straight["micro_batch_size"] == 4
    want, got = train_losses(tmp_path / "straight"), train_losses(run_dir)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step, loss in want.items():
        assert math.isfinite(loss) and got[step] == pytest.approx(loss, rel=RESUME_RTOL), (step, got[step], loss)
    assert resumed["val/loss"] == pytest.approx(straight["val/loss"], rel=RESUME_RTOL)


# ---------------------------------------------------------------------------------------------- DDP (NCCL)
def _ddp_rank(rank: int, world_size: int, port: int, cfg_yaml: str, run_dir, out_dir) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        summary = train(OmegaConf.create(cfg_yaml), run_dir)
        result = {k: summary.get(k) for k in ("status", "step", "device", "error", "world_size", "attention_backend")}
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        result = {"raised": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-1500:]}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason=f"DDP over NCCL needs >= 2 GPUs; this machine has {torch.cuda.device_count()}")
def test_ddp_nccl_two_gpus(data_dir, tmp_path):
    """Two ranks on two GPUs (trainer.device=auto: cuda:LOCAL_RANK), NCCL: both finish at the same step, each on its
    own GPU, with finite losses (alibi+flash: FlexAttention under DDP)."""
    overrides = [o for o in cuda_overrides(data_dir, "alibi", "flash", steps=4,
                                           extra=("trainer.micro_batch_size=2", "trainer.ckpt_every=100"))
                 if o != "trainer.device=cuda"]
    train(compose_train(tiny_overrides(data_dir, steps=1)), tmp_path / "prepare")  # the shards, before the ranks
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg_yaml = OmegaConf.to_yaml(compose_train(overrides), resolve=True)
    mp.spawn(_ddp_rank, args=(2, port, cfg_yaml, tmp_path / "ddp", tmp_path), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(results):
        assert "raised" not in result, f"rank {rank}: {result}"
        assert result["status"] == "finished" and result["world_size"] == 2, f"rank {rank}: {result}"
        assert result["attention_backend"] == "flex", f"rank {rank}: {result}"
    assert results[0]["step"] == results[1]["step"] == 4
    assert {r["device"] for r in results} == {"cuda:0", "cuda:1"}
    assert all(math.isfinite(loss) for loss in train_losses(tmp_path / "ddp").values())
