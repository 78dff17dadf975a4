"""RoPE context extension at inference time (`model.pe.scaling`): PI, "NTK-aware" and YaRN against the YaRN paper
(Peng et al. 2023, arXiv 2309.00071, eqs. 10-22), the config checks, and checkpoints that load with any scaling."""

import math
import os
import subprocess
import sys

import pytest
import torch
from hydra.errors import ConfigCompositionException

from src.checkpoint import load_model, load_weights, read_model_config, save_checkpoint
from src.errors import ConfigError
from src.model import build_model
from src.model.pe.rope import SCALING_TYPES
from src.preflight import check_inputs
from tests.conftest import ROOT, tiny_model_cfg
from tests.train_helpers import compose_train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = 10000.0
# Head dim 16 and L = 2048: with α = 1, β = 32, three dimensions have r > β, three are on the ramp, two r < α.
YARN_MODEL = dict(n_embd=64, n_head=4)
YARN_CONTEXT = 2048


def _model(scaling=None, base=BASE, seed=0, **overrides):
    pe = {"name": "rope", "base": base, **({"scaling": scaling} if scaling is not None else {})}
    torch.manual_seed(seed)
    return build_model(tiny_model_cfg("rope", "regular", pe=pe, **overrides)).eval()


def _pe(scaling=None, base=BASE, **overrides):
    return _model(scaling, base, **overrides).pe


def _head_dim(pe) -> int:
    return 2 * pe.theta.numel()


# --- factor 1 is plain RoPE -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SCALING_TYPES)
def test_factor_one_is_plain_rope_bit_for_bit(kind):
    plain, scaled = _model(), _model({"type": kind, "factor": 1.0})
    scaled.load_state_dict(plain.state_dict(), strict=True)
    x, pos = torch.randn(2, 4, 50, 8), torch.arange(50) * 3
    for pe in (plain.pe, scaled.pe):
        pe.prepare(150)
    assert torch.equal(plain.pe.theta, scaled.pe.theta)
    assert torch.equal(plain.pe.rotate(x, pos), scaled.pe.rotate(x, pos))
    idx = torch.randint(0, 97, (2, 48))  # past block_size 32: the grown tables too
    with torch.no_grad():
        assert torch.equal(plain(idx), scaled(idx))
    assert scaled.pe.variant_name() is None
    wide = {"type": kind, "factor": 1.0, "original_context": YARN_CONTEXT}  # yarn: dimensions on the ramp too
    assert torch.equal(_pe(wide, **YARN_MODEL).theta, _pe(**YARN_MODEL).theta)


# --- linear: Position Interpolation (YaRN eq. 10: g(m) = m / s, h(θ) = θ) ------------------------------------


@pytest.mark.parametrize("s", [2, 4])
def test_position_interpolation_maps_position_s_times_p_to_p(s):
    plain, pi = _pe(), _pe({"type": "linear", "factor": float(s)})
    assert torch.equal(plain.theta, pi.theta)  # frequencies unchanged
    positions = torch.tensor([0, 1, 3, 7, 10, 31, 50])
    pi.prepare(int(s * positions.max()) + 1)
    plain.prepare(int(positions.max()) + 1)
    assert torch.equal(pi.cos[s * positions], plain.cos[positions])
    assert torch.equal(pi.sin[s * positions], plain.sin[positions])
    x = torch.randn(1, 2, positions.numel(), 8)
    assert torch.equal(pi.rotate(x, s * positions), plain.rotate(x, positions))
    # In between, the angle is the fraction of the way: position 1 turns by θ / s.
    assert pi.cos[1].tolist() == pytest.approx(torch.cos(plain.theta / s).tolist(), abs=1e-7)


# --- ntk: "NTK-aware" (YaRN eqs. 14-16: b' = b · s^(|D| / (|D| − 2))) --------------------------------------------


@pytest.mark.parametrize("s", [2.0, 8.0])
def test_ntk_is_plain_rope_with_the_changed_base(s):
    ntk = _pe({"type": "ntk", "factor": s})
    head_dim = _head_dim(ntk)
    plain_new_base = _pe(base=BASE * s ** (head_dim / (head_dim - 2)))
    assert torch.equal(ntk.theta, plain_new_base.theta)
    for pe in (ntk, plain_new_base):
        pe.prepare(200)
    assert torch.equal(ntk.cos, plain_new_base.cos) and torch.equal(ntk.sin, plain_new_base.sin)
    x, pos = torch.randn(1, 2, 20, 8), torch.arange(20) * 9
    assert torch.equal(ntk.rotate(x, pos), plain_new_base.rotate(x, pos))
    # Appendix A.1: the highest frequency is kept, the lowest divided by s like PI.
    plain = _pe()
    assert ntk.theta[0] == plain.theta[0]
    assert ntk.theta[-1].item() == pytest.approx(plain.theta[-1].item() / s, rel=1e-12)


# --- yarn: NTK-by-parts (eqs. 17-20) plus attention temperature (eqs. 21-22) ------------------------------------

def paper_yarn(base, head_dim, s, context, alpha, beta):
    """The paper's formulas, transcribed one dimension at a time in plain floats: (r(d), h(θ_d)) per pair d,
    and √(1/t)."""
    ratios, thetas = [], []
    for d in range(head_dim // 2):
        theta = base ** (-2 * d / head_dim)  # eq. 5 (0-based pairs)
        wavelength = 2 * math.pi * base ** (2 * d / head_dim)  # eq. 13
        r = context / wavelength  # eq. 17
        if r < alpha:  # eq. 18
            gamma = 0.0
        elif r > beta:
            gamma = 1.0
        else:
            gamma = (r - alpha) / (beta - alpha)
        ratios.append(r)
        thetas.append((1 - gamma) * theta / s + gamma * theta)  # eq. 20
    return ratios, thetas, 0.1 * math.log(s) + 1  # eq. 22


@pytest.mark.parametrize("s", [2.0, 4.0, 16.0])
def test_yarn_frequencies_follow_the_ramp(s):
    scaling = {"type": "yarn", "factor": s, "original_context": YARN_CONTEXT}
    yarn, plain = _pe(scaling, **YARN_MODEL), _pe(**YARN_MODEL)
    alpha, beta = 1.0, 32.0  # the defaults: beta_slow, beta_fast
    ratios, paper_thetas, paper_magnitude = paper_yarn(BASE, _head_dim(yarn), s, YARN_CONTEXT, alpha, beta)
    bands = {"keep": [d for d, r in enumerate(ratios) if r > beta],
             "ramp": [d for d, r in enumerate(ratios) if alpha <= r <= beta],
             "interpolate": [d for d, r in enumerate(ratios) if r < alpha]}
    assert bands == {"keep": [0, 1, 2], "ramp": [3, 4, 5], "interpolate": [6, 7]}  # the test covers every band
    for d in bands["keep"]:  # many rotations within L: θ_d kept exactly
        assert yarn.theta[d] == plain.theta[d]
    for d in bands["interpolate"]:  # less than one rotation within L: PI's θ_d / s exactly
        assert yarn.theta[d] == plain.theta[d] / s
    for d in bands["ramp"]:
        gamma = (ratios[d] - alpha) / (beta - alpha)
        expected = (1 - gamma) * plain.theta[d].item() / s + gamma * plain.theta[d].item()
        assert yarn.theta[d].item() == pytest.approx(expected, rel=1e-12)
        assert plain.theta[d].item() / s < yarn.theta[d].item() < plain.theta[d].item()
    assert yarn.theta.tolist() == pytest.approx(paper_thetas, rel=1e-12)

    # √(1/t) multiplies cos and sin, so q and k: norms grow by it and the logits by its square (1/t, eq. 21).
    yarn.prepare(4 * YARN_CONTEXT)
    m = torch.tensor([0, 1, 5, 100, 2047, 5000, 8191])
    angles = m.double()[:, None] * torch.tensor(paper_thetas, dtype=torch.float64)
    assert torch.allclose(yarn.cos[m].double(), paper_magnitude * angles.cos(), atol=1e-6, rtol=0)
    assert torch.allclose(yarn.sin[m].double(), paper_magnitude * angles.sin(), atol=1e-6, rtol=0)
    q, k = torch.randn(2, 1, 1, 1, 16, dtype=torch.float64).unbind(0)
    at = torch.tensor
    assert yarn.rotate(q, at([7])).norm().item() == pytest.approx(paper_magnitude * q.norm().item(), rel=1e-6)
    score = (yarn.rotate(q, at([3000])) * yarn.rotate(k, at([2990]))).sum().item()
    relative = (yarn.rotate(q, at([10])) * yarn.rotate(k, at([0]))).sum().item()
    assert score == pytest.approx(relative, rel=1e-4, abs=1e-4)  # still relative (eq. 9)
    unrotated = (q * k).sum().item()
    assert (yarn.rotate(q, at([0])) * yarn.rotate(k, at([0]))).sum().item() == pytest.approx(
        paper_magnitude ** 2 * unrotated, rel=1e-6, abs=1e-9)


def test_yarn_context_defaults_to_block_size_and_betas_move_the_bands():
    by_default = _pe({"type": "yarn", "factor": 4.0}, **YARN_MODEL)
    explicit = _pe({"type": "yarn", "factor": 4.0, "original_context": 32}, **YARN_MODEL)
    assert torch.equal(by_default.theta, explicit.theta)
    _, paper_thetas, _ = paper_yarn(BASE, 16, 4.0, 32, 1.0, 32.0)
    assert by_default.theta.tolist() == pytest.approx(paper_thetas, rel=1e-12)
    wide = _pe({"type": "yarn", "factor": 4.0, "original_context": YARN_CONTEXT, "beta_fast": 400.0,
                "beta_slow": 0.01}, **YARN_MODEL)
    _, paper_thetas, _ = paper_yarn(BASE, 16, 4.0, YARN_CONTEXT, 0.01, 400.0)
    assert wide.theta.tolist() == pytest.approx(paper_thetas, rel=1e-12)
    assert wide.theta[0] != _pe(**YARN_MODEL).theta[0]  # r(0) ≈ 326 < β = 400: now on the ramp


# --- names and config errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaling, name", [
    (None, None),
    ({"type": "none", "factor": 4.0}, None),
    ({"type": "yarn", "factor": 1.0}, None),
    ({"type": "yarn", "factor": 4.0}, "yarn×4"),
    ({"type": "linear", "factor": 2}, "linear×2"),
    ({"type": "ntk", "factor": 8.0}, "ntk×8"),
    ({"type": "yarn", "factor": 2.5}, "yarn×2.5"),
])
def test_variant_name(scaling, name):
    assert _pe(scaling).variant_name() == name


def test_scaling_composes_through_hydra():
    cfg = compose_train(["model=tiny", "model/pe=rope", "model.pe.scaling.type=yarn", "model.pe.scaling.factor=4"])
    assert cfg.model.pe.scaling.type == "yarn" and cfg.model.pe.scaling.factor == 4.0
    assert build_model(cfg.model).pe.variant_name() == "yarn×4"
    assert compose_train(["model/pe=rope"]).model.pe.scaling.type == "none"  # the dataclass default


def test_a_misspelt_scaling_key_fails_at_compose_naming_it():
    for override, key in (("model.pe.scaling.typo=1", "typo"), ("model.pe.scaling.factor=big", "factor")):
        with pytest.raises(ConfigCompositionException) as error:
            compose_train(["model/pe=rope", override])
        assert key in str(error.value) + str(error.value.__cause__)


@pytest.mark.parametrize("override, message", [
    ("model.pe.scaling.type=foo", "model.pe.scaling.type must be one of none, linear, ntk, yarn, got 'foo'"),
    ("model.pe.scaling.factor=0.5", "model.pe.scaling.factor must be >= 1"),
    ("model.pe.scaling.beta_fast=0.5", "model.pe.scaling needs beta_fast > beta_slow > 0, got beta_fast=0.5"),
    ("model.pe.scaling.beta_slow=0", "beta_slow=0.0"),
    ("model.pe.scaling.original_context=0", "model.pe.scaling.original_context must be positive"),
])
def test_bad_scaling_values_are_one_line_config_errors(override, message, tmp_path):
    cfg = compose_train(["model/pe=rope", override, f"data.cache_dir={tmp_path}"])
    with pytest.raises(ConfigError) as raised:
        check_inputs(cfg)
    assert message in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.slow
def test_train_cli_composes_scaling_and_reports_a_bad_type_in_one_line(tmp_path):
    def train_cli(*args):
        env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        return subprocess.run([sys.executable, "-m", "src.train", f"runs_dir={tmp_path / 'runs'}",
                               f"data.cache_dir={tmp_path / 'data'}", "model/pe=rope", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    composed = train_cli("model.pe.scaling.type=yarn", "model.pe.scaling.factor=4", "--cfg", "job")
    assert composed.returncode == 0, composed.stderr
    assert "type: yarn" in composed.stdout and "factor: 4.0" in composed.stdout
    bad = train_cli("model.pe.scaling.type=foo")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert bad.stderr.startswith("error: model.pe.scaling.type must be one of none, linear, ntk, yarn, got 'foo'")
    assert not (tmp_path / "runs").exists()


# --- checkpoints ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn"])
def test_a_plain_rope_state_dict_loads_into_a_scaled_model_and_back(kind):
    plain, scaled = _model(seed=1), _model({"type": kind, "factor": 4.0}, seed=2)
    assert plain.state_dict().keys() == scaled.state_dict().keys()
    scaled.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(scaled.state_dict(), strict=True)
    idx = torch.randint(0, 97, (1, 32))
    with torch.no_grad():
        assert not torch.equal(plain(idx), scaled(idx))  # same weights, other angles


def test_a_checkpoint_without_scaling_in_its_config_loads_with_any_scaling(tmp_path):
    plain = _model()
    config = tiny_model_cfg("rope", "regular")
    assert "scaling" not in config["pe"]  # as an old checkpoint's model_config.json
    ckpt = save_checkpoint(tmp_path, 1, plain, config, {}, keep_last=1)
    loaded, _ = load_model(ckpt)
    assert loaded.pe.variant_name() is None
    saved = read_model_config(ckpt)
    saved["pe"]["scaling"] = {"type": "yarn", "factor": 4.0}
    scaled = build_model(saved)
    load_weights(scaled, ckpt)  # raises on any missing or unexpected key
    assert scaled.pe.variant_name() == "yarn×4"
    for name, tensor in plain.state_dict().items():
        assert torch.equal(scaled.state_dict()[name], tensor), name
