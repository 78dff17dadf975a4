"""T5 relative position bias: the bucketing against a transcription of T5's reference, one shared table that
learns, the dense bias and FlexAttention's score_mod, config errors."""

import math

import pytest
import torch

from src.errors import ConfigError
from src.model import build_model
from src.model.config import ModelConfig
from src.model.pe.t5_bias import T5Bias, T5BiasConfig, relative_position_bucket
from tests.conftest import tiny_model_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hf_relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """HF transformers' `T5Attention._relative_position_bucket` (from Mesh TensorFlow), as written there."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
    )
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


def reference_bucket(q_pos, k_pos, num_buckets=32, max_distance=128):
    """HF computes relative_position = memory_position − context_position = k − q, on integer positions."""
    return hf_relative_position_bucket(k_pos.long() - q_pos.long(), bidirectional=False, num_buckets=num_buckets,
                                       max_distance=max_distance)


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (16, 64), (8, 20)])
def test_buckets_equal_the_t5_reference_for_every_distance(num_buckets, max_distance):
    q_pos = torch.arange(2001)
    k_pos = torch.zeros_like(q_pos)
    expected = reference_bucket(q_pos, k_pos, num_buckets, max_distance)
    for dtype in (torch.long, torch.float32):  # positions arrive as floats in `bias`
        got = relative_position_bucket((q_pos - k_pos).to(dtype), num_buckets, max_distance)
        assert got.dtype == torch.long and torch.equal(got, expected)
    # fractional distances (Linformer's slots) take the bucket of their floor
    assert torch.equal(relative_position_bucket(q_pos + 0.5, num_buckets, max_distance), expected)
    # future keys (masked anyway) fall in bucket 0, as the reference's clamp puts them
    assert torch.equal(relative_position_bucket(-q_pos.float() - 0.5, num_buckets, max_distance),
                       torch.zeros_like(expected))


def test_bucket_boundaries_at_the_defaults():
    d = torch.tensor([0, 1, 15, 16, 17, 32, 64, 127, 128, 129, 10_000, 10**7])
    ref = reference_bucket(d, torch.zeros_like(d))
    assert ref.tolist() == [0, 1, 15, 16, 16, 21, 26, 31, 31, 31, 31, 31]
    assert torch.equal(relative_position_bucket(d.float()), ref)


def test_init_is_t5s_normal_with_std_d_model_to_the_minus_half():
    torch.manual_seed(0)
    cfg = T5BiasConfig(name="t5_bias", num_buckets=512, max_distance=1024)  # 32768 draws
    pe = T5Bias(cfg, ModelConfig(n_layer=1, n_head=64, n_embd=1024))
    assert pe.table.shape == (512, 64)
    assert pe.table.mean().abs().item() < 3e-3 and pe.table.std().item() == pytest.approx(1024 ** -0.5, rel=0.02)


@pytest.mark.parametrize("attention", ["regular", "flash", "linformer"])
def test_one_table_shared_by_every_layer_and_it_learns(attention):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg("t5_bias", attention))
    assert isinstance(model.pe, T5Bias) and all(block.attn.pe is None for block in model.h)
    pe_params = [(name, tuple(p.shape)) for name, p in model.named_parameters()
                 if name.startswith("pe.") or ".pe." in name]
    assert pe_params == [("pe.table", (32, 4))]
    assert model.pe.table.std().item() == pytest.approx(32 ** -0.5, rel=0.5)  # not GPT-2's 0.02
    idx = torch.randint(0, 97, (2, 32))
    _, loss = model(idx, idx)
    loss.backward()
    grad = model.pe.table.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad[:16].abs().sum(-1) > 0).all()  # every exact bucket (distances 0..15 occur) gets a gradient


def test_bias_matrix_is_the_table_gathered_at_the_buckets():
    torch.manual_seed(0)
    pe = build_model(tiny_model_cfg("t5_bias", "regular")).pe
    q_pos = torch.arange(300.0)
    k_pos = torch.cat([torch.arange(300.0), torch.tensor([3.5, 11.5, 150.5])])  # with slot-like positions
    bias = pe.bias_matrix(q_pos, k_pos)
    buckets = reference_bucket(q_pos[:, None], k_pos[None, :].ceil())  # integer q: ⌊q − k⌋ = q − ⌈k⌉
    assert bias.shape == (4, 300, 303)
    assert torch.equal(bias, pe.table.T[:, buckets])
    assert torch.equal(pe.bias_matrix(q_pos[None], k_pos[None]), bias[:, None])  # leading dims pass through


def test_flex_score_mod_equals_the_dense_bias_past_max_distance():
    """test_model's FlexAttention check runs every bias PE at 32 tokens; here past max_distance (last bucket)."""
    from src.model.attention.flex import flex_attention_with_bias
    from src.model.attention.regular import RegularAttention, RegularConfig

    torch.manual_seed(0)
    model = build_model(tiny_model_cfg("t5_bias", "flash"))
    with torch.no_grad():
        model.pe.table.normal_(std=2.0)  # trained-looking: the bias moves the attention noticeably
    q, k, v = torch.randn(3, 1, 4, 200, 8).unbind(0)
    pos = torch.arange(200)
    with torch.no_grad():
        expected = RegularAttention(RegularConfig(name="regular"), model.config)(q, k, v, pos, pos, model.pe)
        got = flex_attention_with_bias(q, k, v, pos, pos, model.pe, lambda qi, ki: pos[ki] <= pos[qi], compiled=False)
    assert torch.allclose(expected, got, atol=1e-5)


@pytest.mark.parametrize("options, key", [({"num_buckets": 1}, "model.pe.num_buckets"),
                                          ({"num_buckets": 32, "max_distance": 16}, "model.pe.max_distance")])
def test_bad_values_name_the_key(options, key):
    with pytest.raises(ConfigError, match=key):
        build_model(tiny_model_cfg("t5_bias", "flash", pe={"name": "t5_bias", **options}))
