"""FlexAttention (Dong et al. 2024, "Flex Attention") with a PE's bias as `score_mod`: the CUDA path of the
flash and Linformer mechanisms.

A mechanism states which keys a query may see (`visible(q_idx, kv_idx)`, indices into q_pos / k_pos);
the compiled kernel then skips every fully hidden 128×128 block and adds the PE's elementwise bias
(`pe.score_mod_bias`) inside the kernel, so the scores are never materialised, nor is the bias except
FIRE's batch-independent [H, T, T] table. FlexAttention has no backward on CPU (torch 2.13), so the
mechanisms use it for training on CUDA only (`flex_applies`); the tests check its forward on CPU,
compiled as on CUDA, against the dense paths.
"""

from collections.abc import Callable
from functools import lru_cache

import torch
from torch import Tensor


@lru_cache(maxsize=1)
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention_with_bias(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, pe,
                             visible: Callable[[Tensor, Tensor], Tensor], compiled: bool = True) -> Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    score_mod = None
    if pe.has_bias:
        bias = pe.score_mod_bias(q_pos, k_pos)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias(h, q_idx, kv_idx).to(score.dtype)

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(q_idx, kv_idx)

    block_mask = create_block_mask(mask_mod, None, None, q.size(-2), k.size(-2), device=q.device)
    # Inside a compiled model dynamo traces flex_attention itself; compiling it again there only warns.
    attend = compiled_flex_attention() if compiled and not torch.compiler.is_compiling() else flex_attention
    return attend(q, k, v, score_mod=score_mod, block_mask=block_mask)


def flex_applies(use_flex: bool, q: Tensor, dropout_p: float) -> bool:
    """On CUDA, without attention dropout (it has none), and only when a backward pass follows: the kernel
    is compiled per static shape, and inference lengths vary (prompts, every KV-cache step, extrapolation),
    so there the mechanism's dense path serves without recompiling."""
    return use_flex and q.is_cuda and dropout_p == 0.0 and q.requires_grad
