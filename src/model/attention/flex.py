"""FlexAttention (Dong et al. 2024, "Flex Attention") with a PE's bias as `score_mod`: the CUDA path of the
flash and Linformer mechanisms.

A mechanism states which keys a query may see (`visible(q_idx, kv_idx)`, indices into q_pos / k_pos);
the compiled kernel then skips every fully hidden 128×128 block and adds the PE's elementwise bias
(`pe.score_mod_bias`) inside the kernel, so the scores are never materialised, nor is the bias except
FIRE's batch-independent [H, T, T] table. FlexAttention has no backward on CPU (torch 2.13), so the
mechanisms use it for training on CUDA only (`flex_applies`).

Fallback. FlexAttention needs Triton and a GPU its templates support; where it cannot compile or run, the
mechanisms take their dense path instead (flash: SDPA + float mask; Linformer: the explicit chunked path)
and one warning per process names the error. `flex_available(device, dtype)` decides, once per device and
dtype: it compiles and runs FlexAttention forward and backward on a tiny input and checks the numbers
against a dense reference (`_probe_flex`). Eagerly the mechanisms run the probe themselves at their first
training call, and an error of a later flex call still marks FlexAttention unusable and redoes that call
densely (`flex_or_none`). Inside a torch.compile'd model an error surfaces only when the whole model
compiles, so whoever compiles a model must probe first, eagerly: `attention_backend(model, device)`
(`base.py`) does, and says which path the training forward takes. Traced unprobed, the flex path is taken.

Block masks depend only on the mechanism's visibility rule and the shapes, so eagerly they are built once
and shared by every layer and step (`_block_mask`, keyed by the mechanism's `mask_key` — the Python ints the
rule depends on — the shapes and the device). Inside a compiled model the mask is part of the graph, where
Inductor merges the layers' identical builds into one per step (seen on CPU, torch 2.13).

Tests (CPU): the forward of both mechanisms' flex paths equals their dense paths eagerly; compiled (Inductor's
CPU template, slow tests) only flash's square causal mask is checked, since with Linformer's longer key side
that template gave wrong rows on a CPU without AVX-512; Linformer's compiled variant is checked on CUDA.
The fallback is tested by injecting failures (a CPU that passes for CUDA, a failing probe or flex call).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from functools import lru_cache

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# Device types whose training forward may use FlexAttention (tests add "cpu" to exercise the decision).
FLEX_DEVICE_TYPES = frozenset({"cuda"})

# (device type, device index, dtype) -> (usable, the error's first line); filled eagerly, read when tracing.
_VERDICTS: dict[tuple, tuple[bool, str | None]] = {}
_WARNED = [False]  # the fallback warning is printed once per process
_BLOCK_MASKS: OrderedDict = OrderedDict()  # (mask_key, Tq, Tk, device key) -> BlockMask
_BLOCK_MASK_CACHE_SIZE = 16


@lru_cache(maxsize=1)
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _device_key(device: torch.device | str) -> tuple[str, int | None]:
    device = torch.device(device)
    index = device.index
    if index is None and device.type == "cuda":
        index = torch.cuda.current_device()
    return device.type, index


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0].rstrip('.')}" if lines else type(err).__name__


def _mark_unusable(device: torch.device, dtype: torch.dtype, err: BaseException) -> str:
    key = (*_device_key(device), dtype)
    reason = _first_line(err)
    _VERDICTS[key] = (False, reason)
    if not _WARNED[0]:
        _WARNED[0] = True
        where = key[0] if key[1] is None else f"{key[0]}:{key[1]}"
        log.warning("FlexAttention cannot run on %s (%s): %s; the dense attention path is used instead", where,
                    str(dtype).removeprefix("torch."), reason)
    return reason


def flex_available(device: torch.device | str, dtype: torch.dtype) -> tuple[bool, str | None]:
    """(True, None) if FlexAttention compiles, runs and gives the dense numbers, forward and backward, on
    `device` with inputs of `dtype` (the attention's compute dtype: bfloat16 under bf16 autocast); else
    (False, why). Probes once per device and dtype (`_probe_flex`, seconds of compilation on a GPU) and
    remembers; a failure warns once per process. Devices outside `FLEX_DEVICE_TYPES` are (False, why),
    without probing or warning. Call it eagerly, before the model is compiled."""
    key = (*_device_key(device), dtype)
    if key not in _VERDICTS:
        if key[0] not in FLEX_DEVICE_TYPES:
            return False, f"FlexAttention trains on {', '.join(sorted(FLEX_DEVICE_TYPES))} only, not {key[0]}"
        try:
            _probe_flex(torch.device(device), dtype)
            _VERDICTS[key] = (True, None)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # any compile or run error: the dense path
            _mark_unusable(torch.device(device), dtype, err)
    return _VERDICTS[key]


def _probe_flex(device: torch.device, dtype: torch.dtype, backward: bool = True) -> None:
    """Compile and run FlexAttention as the training path does (the compiled kernel, a block mask, a
    score_mod reading a captured tensor that needs a gradient, more keys than queries as Linformer has) on a
    tiny input, forward and backward; raise if anything fails or the numbers are not the dense reference's.
    Deterministic inputs: the probe draws no random numbers, so it leaves the seeded RNG streams alone."""
    from torch.nn.attention.flex_attention import create_block_mask

    H, Tq, Tk, D = 2, 128, 256, 16
    offset = Tk - Tq  # the queries are the last Tq of the Tk positions

    def wave(n: int, freq: float) -> Tensor:
        x = torch.sin(torch.arange(H * n * D, device=device, dtype=torch.float32) * freq).view(1, H, n, D)
        return x.to(dtype).requires_grad_(backward)

    with torch.autocast(device.type, enabled=False), torch.enable_grad():
        q, k, v = wave(Tq, 0.37), wave(Tk, 0.53), wave(Tk, 0.71)
        slopes = torch.tensor([0.05, 0.02], device=device, requires_grad=backward)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + (slopes[h] * (kv_idx - q_idx - offset)).to(score.dtype)

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        block_mask = create_block_mask(mask_mod, None, None, Tq, Tk, device=device)
        out = compiled_flex_attention()(q, k, v, score_mod=score_mod, block_mask=block_mask)

        qf, kf, vf = (x.detach().float().requires_grad_(backward) for x in (q, k, v))
        ref_slopes = slopes.detach().clone().requires_grad_(backward)
        q_idx = torch.arange(Tq, device=device)[:, None]
        kv_idx = torch.arange(Tk, device=device)[None, :]
        scores = qf @ kf.transpose(-2, -1) / math.sqrt(D) + ref_slopes[:, None, None] * (kv_idx - q_idx - offset)
        expected = scores.masked_fill(kv_idx > q_idx + offset, float("-inf")).softmax(-1) @ vf

        tolerance = 2e-2 if dtype == torch.float32 else 1e-1  # wrong kernels are off by O(1); TF32, bf16 are not
        pairs = [("forward", out.float(), expected)]
        if backward:
            grads = torch.autograd.grad(out.float().square().sum(), (q, k, v, slopes))
            ref_grads = torch.autograd.grad(expected.square().sum(), (qf, kf, vf, ref_slopes))
            pairs += [(f"gradient of {name}", g.float(), r)
                      for name, g, r in zip(("q", "k", "v", "the score_mod's tensor"), grads, ref_grads)]
    for what, got, ref in pairs:
        error = (got - ref).abs().max().item()
        scale = ref.abs().max().item() + 1.0
        if not error <= tolerance * scale:  # also catches NaN
            raise RuntimeError(f"compiled FlexAttention's {what} differs from the dense reference by {error:.3g} "
                               f"(tolerance {tolerance * scale:.3g})")


def flex_trains(use_flex: bool, device: torch.device, dtype: torch.dtype, dropout_p: float) -> bool:
    """Whether a training forward (a backward follows) on `device` with attention inputs of `dtype` takes
    the flex path: `use_flex`, no attention dropout (FlexAttention has none), a device in
    `FLEX_DEVICE_TYPES`, and FlexAttention available there (`flex_available`; while a compiled model is
    traced only the remembered verdict is read, and an unprobed device counts as available)."""
    if not (use_flex and dropout_p == 0.0 and device.type in FLEX_DEVICE_TYPES):
        return False
    if torch.compiler.is_compiling():
        verdict = _VERDICTS.get((device.type, device.index, dtype))
        return verdict is None or verdict[0]
    return flex_available(device, dtype)[0]


def flex_applies(use_flex: bool, q: Tensor, dropout_p: float) -> bool:
    """`flex_trains` for these queries, and only when a backward pass follows: the kernel is compiled per
    static shape, and inference lengths vary (prompts, every KV-cache step, extrapolation), so there the
    mechanism's dense path serves without recompiling."""
    return q.requires_grad and flex_trains(use_flex, q.device, q.dtype, dropout_p)


def flex_or_none(call: Callable[[], Tensor], q: Tensor) -> Tensor | None:
    """`call()`, the mechanism's flex call. Eagerly, if it raises, FlexAttention is marked unusable for q's
    device and dtype (one warning per process) and None is returned: the caller then redoes the call on its
    dense path, as every later call does. Traced (a compiled model), the call is returned as it is."""
    if torch.compiler.is_compiling():
        return call()
    try:
        return call()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # any compile or run error: the dense path
        _mark_unusable(q.device, q.dtype, err)
        return None


def _block_mask(mask_mod, mask_key: Hashable | None, q_len: int, kv_len: int, device: torch.device):
    """The BlockMask of `mask_mod` for q_len × kv_len. With a `mask_key` (hashable Python values, which with
    the shapes and the device determine the rule; never tensor values) it is built once, eagerly, and reused
    by every layer and step; traced, it is built in the graph."""
    from torch.nn.attention.flex_attention import create_block_mask

    if mask_key is None or torch.compiler.is_compiling():
        return create_block_mask(mask_mod, None, None, q_len, kv_len, device=device)
    key = (mask_key, q_len, kv_len, _device_key(device))
    block_mask = _BLOCK_MASKS.get(key)
    if block_mask is None:
        block_mask = _BLOCK_MASKS[key] = create_block_mask(mask_mod, None, None, q_len, kv_len, device=device)
        while len(_BLOCK_MASKS) > _BLOCK_MASK_CACHE_SIZE:
            _BLOCK_MASKS.popitem(last=False)
    else:
        _BLOCK_MASKS.move_to_end(key)
    return block_mask


def flex_attention_with_bias(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, pe,
                             visible: Callable[[Tensor, Tensor], Tensor], compiled: bool = True,
                             mask_key: Hashable | None = None) -> Tensor:
    """FlexAttention over q against k/v with `pe`'s bias and the keys `visible(q_idx, kv_idx)` lets through.
    `mask_key`: see `_block_mask` (None: the rule depends on tensor values, e.g. positions; built per call)."""
    from torch.nn.attention.flex_attention import flex_attention

    score_mod = None
    if pe.has_bias:
        bias = pe.score_mod_bias(q_pos, k_pos)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias(h, q_idx, kv_idx).to(score.dtype)

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(q_idx, kv_idx)

    block_mask = _block_mask(mask_mod, mask_key, q.size(-2), k.size(-2), q.device)
    # Inside a compiled model dynamo traces flex_attention itself; compiling it again there only warns.
    attend = compiled_flex_attention() if compiled and not torch.compiler.is_compiling() else flex_attention
    return attend(q, k, v, score_mod=score_mod, block_mask=block_mask)
