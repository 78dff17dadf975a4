"""Each PE against its paper on small hand-checkable cases."""

import math

import pytest
import torch

from src.model import build_model
from src.model.pe.alibi import alibi_slopes
from tests.conftest import tiny_model_cfg


def _pe(name, **pe_options):
    model = build_model(tiny_model_cfg(name, "regular", pe={"name": name, **pe_options}))
    return model.h[0].attn.pe or model.pe


def test_alibi_slopes_match_the_paper():
    # Press et al.: 8 heads -> 1/2, 1/4, ..., 1/256.
    assert alibi_slopes(8) == pytest.approx([2 ** -(i + 1) for i in range(8)])
    # 12 heads: the 8-head slopes, then every other slope of the 16-head sequence (2^-0.5, 2^-1.5, ...).
    assert alibi_slopes(12) == pytest.approx([2 ** -(i + 1) for i in range(8)] + [2 ** -(k + 0.5) for k in range(4)])


def test_alibi_bias_is_minus_slope_times_distance():
    pe = _pe("alibi")
    bias = pe.bias_matrix(torch.arange(4), torch.arange(4))
    assert bias.shape == (4, 4, 4)
    slopes = torch.tensor(alibi_slopes(4))
    assert torch.allclose(bias[:, 3, 0], -3 * slopes)
    assert torch.allclose(bias[:, 2, 2], torch.zeros(4))


def test_rope_preserves_norms_and_depends_only_on_relative_position():
    pe = _pe("rope")
    pe.prepare(104)  # the model calls this before every forward pass
    q, k = torch.randn(2, 1, 1, 1, 8).unbind(0)

    def score(m, n):
        return (pe.rotate(q, torch.tensor([m])) * pe.rotate(k, torch.tensor([n]))).sum().item()

    x = torch.randn(1, 1, 5, 8)
    assert torch.allclose(pe.rotate(x, torch.arange(5)).norm(dim=-1), x.norm(dim=-1), atol=1e-6)
    assert score(5, 2) == pytest.approx(score(103, 100), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-4)
    # Position 0 is the identity; pair (x0, x1) at position 1 rotates by θ_0 = 1 rad.
    assert torch.allclose(pe.rotate(x, torch.zeros(5, dtype=torch.long)), x)
    unit = torch.zeros(1, 1, 1, 8)
    unit[..., 0] = 1
    rotated_pair = pe.rotate(unit, torch.tensor([1]))[..., :2].flatten()
    assert torch.allclose(rotated_pair, torch.tensor([math.cos(1), math.sin(1)]))


def test_rope_table_grows_past_block_size():
    pe = _pe("rope")
    assert pe.cos.shape[0] == 32
    pe.prepare(101)
    assert pe.cos.shape[0] >= 101
    x = torch.randn(1, 1, 1, 8)
    assert torch.allclose(pe.rotate(x, torch.tensor([100])).norm(), x.norm(), atol=1e-6)


def test_sinusoidal_values():
    pe = _pe("sinusoidal")
    table = pe.table(torch.arange(3))
    x = torch.randn(1, 3, 32)
    assert torch.allclose(pe.embed(x, torch.arange(3)), x * math.sqrt(32) + table)
    d = 32
    assert torch.allclose(table[0], torch.tensor([0.0, 1.0] * (d // 2)))
    assert table[2, 0].item() == pytest.approx(math.sin(2))
    assert table[2, 1].item() == pytest.approx(math.cos(2))
    assert table[2, 2].item() == pytest.approx(math.sin(2 / 10000 ** (2 / d)), abs=1e-6)


@pytest.mark.parametrize("variant", ["log", "power"])
def test_kerple_bias_shape_sign_and_formula(variant):
    torch.manual_seed(0)
    pe = _pe("kerple", variant=variant)
    assert (pe.r1 > 0).all() and (pe.r2 > 0).all()
    bias = pe.bias_matrix(torch.arange(6), torch.arange(6))
    assert bias.shape == (4, 6, 6)
    lower = bias[:, torch.tril_indices(6, 6, -1)[0], torch.tril_indices(6, 6, -1)[1]]
    assert (lower < 0).all() and torch.allclose(bias.diagonal(dim1=1, dim2=2), torch.zeros(4, 6))
    d = 5.0
    expected = -pe.r1 * (torch.log1p(pe.r2 * d) if variant == "log" else d ** pe.r2)
    assert torch.allclose(bias[:, 5, 0], expected)
    assert (bias[:, 5, 0] < bias[:, 5, 3]).all()  # monotone: farther is penalised more


def test_fire_bias_matches_the_formula():
    torch.manual_seed(0)
    pe = _pe("fire")
    q_pos, k_pos = torch.arange(700.0), torch.arange(700.0)
    bias = pe.bias_matrix(q_pos, k_pos)
    assert bias.shape == (4, 700, 700)
    # i = 600 > L = 512: normalise by ψ(600); i = 10 < L: by ψ(512).
    def psi(x):
        return math.log(0.1 * x + 1)
    for i, j in ((600, 100), (10, 3)):
        x = torch.tensor([[psi(i - j) / (psi(max(512, i)) + 1e-6)]])
        assert torch.allclose(bias[:, i, j], pe.mlp(x)[0], atol=1e-5)
    assert pe.c.requires_grad and pe.L_multiplier.requires_grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fire_linear_pieces_equal_the_mlp_in_values_and_gradients(seed):
    torch.manual_seed(seed)
    pe = _pe("fire")
    with torch.no_grad():  # trained-looking weights, and units with w1 = 0 (constant on / off)
        for p in pe.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        pe.mlp[0].weight[:2] = 0.0
        pe.mlp[0].bias[:2] = torch.tensor([0.7, -0.3])
    q_pos, k_pos = torch.arange(600.0), torch.arange(600.0)
    weights = torch.randn(4, 600, 600)

    def values_and_grads(bias_fn):
        pe.zero_grad()
        bias = bias_fn()
        (bias * weights).sum().backward()
        return bias.detach(), {name: p.grad.clone() for name, p in pe.named_parameters()}

    got, got_grads = values_and_grads(lambda: pe.bias_matrix(q_pos, k_pos))
    x = lambda: pe.normalized_distance(q_pos[:, None], k_pos[None, :])  # noqa: E731
    expected, expected_grads = values_and_grads(lambda: pe.mlp(x()[..., None]).movedim(-1, 0))
    assert torch.allclose(got, expected, atol=1e-5)
    for name, grad in expected_grads.items():
        assert torch.allclose(got_grads[name], grad, rtol=1e-3, atol=1e-3 * grad.abs().max()), name


def test_bias_pes_have_per_layer_parameters():
    model = build_model(tiny_model_cfg("fire", "flash"))
    assert model.h[0].attn.pe is not model.h[1].attn.pe
    assert build_model(tiny_model_cfg("alibi", "flash")).h[0].attn.pe is None  # fixed slopes: shared
