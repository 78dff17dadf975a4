"""FlexAttention's fallback to the dense paths, the backend a training forward reports, and the block mask
built once. On CPU by injection: FLEX_DEVICE_TYPES lets the CPU pass for CUDA, and the probe or the flex call
is made to fail (or, for the forward numbers, eager FlexAttention on detached inputs stands in for the
compiled kernel, since FlexAttention has no backward on CPU)."""

import logging
from collections import OrderedDict

import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

from src.model import build_model
from src.model.attention import attention_backend, flex, flex_available
from tests.conftest import PES, tiny_model_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
FLOAT = ("cpu", None, torch.float32)  # the verdict key of float32 attention on the CPU


@pytest.fixture
def flex_state(monkeypatch):
    """Fresh process state (verdicts, the once-per-process warning, the block masks), restored afterwards."""
    monkeypatch.setattr(flex, "_VERDICTS", {})
    monkeypatch.setattr(flex, "_WARNED", [False])
    monkeypatch.setattr(flex, "_BLOCK_MASKS", OrderedDict())
    return flex


@pytest.fixture
def cpu_as_cuda(flex_state, monkeypatch):
    """The CPU passes for a device FlexAttention trains on."""
    monkeypatch.setattr(flex, "FLEX_DEVICE_TYPES", frozenset({"cuda", "cpu"}))
    return flex


def eager_flex_on_detached_inputs():
    """Forward-only stand-in for the compiled kernel: eager FlexAttention refuses inputs that need a grad on CPU."""
    return lambda q, k, v, **kw: torch_flex.flex_attention(q.detach(), k.detach(), v.detach(), **kw)


def flex_warnings(caplog):
    return [r for r in caplog.records if r.name == flex.__name__ and r.levelno == logging.WARNING]


def train_forward(model, idx, steps=2):
    """`steps` training forwards (grad on) with a backward each: the logits of the last, the grads."""
    model.train()
    for _ in range(steps):
        model.zero_grad()
        logits, loss = model(idx, idx)
        loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def without_flex(cfg):
    return cfg | {"attention": cfg["attention"] | {"use_flex": False}}


def dense_reference(cfg, idx):
    """The same model's (same seed, same weights) training forward on its dense path: use_flex off."""
    torch.manual_seed(0)
    return train_forward(build_model(without_flex(cfg)), idx, steps=1)


DENSE = {"flash": "sdpa+bias-mask", "linformer": "linformer-dense"}


@pytest.mark.parametrize("attention", ["flash", "linformer"])
def test_failing_probe_falls_back_to_the_dense_path_with_one_warning(attention, cpu_as_cuda, monkeypatch, caplog):
    cfg = tiny_model_cfg("alibi", attention)
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    expected_logits, expected_grads = dense_reference(cfg, idx)

    def probe(device, dtype, backward=True):
        raise RuntimeError("Cannot find a working triton installation.\nMore details here")

    monkeypatch.setattr(flex, "_probe_flex", probe)
    monkeypatch.setattr(flex, "compiled_flex_attention", lambda: pytest.fail("flex called after a failed probe"))
    torch.manual_seed(0)
    model = build_model(cfg)
    with caplog.at_level(logging.WARNING, logger=flex.__name__):
        assert attention_backend(model, CPU) == DENSE[attention]
        logits, grads = train_forward(model, idx)
    assert torch.equal(logits, expected_logits)
    assert all(torch.equal(grads[n], g) for n, g in expected_grads.items())
    [warning] = flex_warnings(caplog)
    message = warning.getMessage()
    assert "RuntimeError: Cannot find a working triton installation" in message and "dense" in message
    assert "\n" not in message and "More details" not in message
    assert flex_available(CPU, torch.float32) == (False, "RuntimeError: Cannot find a working triton installation")


@pytest.mark.parametrize("attention", ["flash", "linformer"])
def test_failing_first_flex_call_is_redone_densely_with_one_warning(attention, cpu_as_cuda, monkeypatch, caplog):
    """The probe passes, the first real call fails (eager FlexAttention on CPU with grad raises): that call
    is redone densely, every later one goes dense, and the backend says so."""
    cfg = tiny_model_cfg("alibi", attention)
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    expected_logits, expected_grads = dense_reference(cfg, idx)
    monkeypatch.setattr(flex, "_probe_flex", lambda device, dtype, backward=True: None)
    monkeypatch.setattr(flex, "compiled_flex_attention", lambda: torch_flex.flex_attention)
    torch.manual_seed(0)
    model = build_model(cfg)
    with caplog.at_level(logging.WARNING, logger=flex.__name__):
        assert attention_backend(model, CPU) == "flex"
        logits, grads = train_forward(model, idx)
        assert attention_backend(model, CPU) == DENSE[attention]
    assert torch.equal(logits, expected_logits)
    assert all(torch.equal(grads[n], g) for n, g in expected_grads.items())
    [warning] = flex_warnings(caplog)
    assert "NotImplementedError: FlexAttention does not support backward on CPU" in warning.getMessage()
    assert flex_available(CPU, torch.float32)[0] is False


def test_real_probe_fails_where_flex_cannot_train_and_is_asked_once(cpu_as_cuda, monkeypatch, caplog):
    """The probe itself (compiled FlexAttention forward and backward) on a CPU passing for CUDA: it fails, as
    FlexAttention has no backward on CPU; the verdict is kept, and a second failing dtype warns no more."""
    with caplog.at_level(logging.WARNING, logger=flex.__name__):
        usable, why = flex_available(CPU, torch.float32)
        assert not usable and why.startswith("NotImplementedError")
        monkeypatch.setattr(flex, "_probe_flex", lambda *a, **k: pytest.fail("probed twice"))
        assert flex_available("cpu", torch.float32) == (False, why)
        monkeypatch.setattr(flex, "_probe_flex", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bf16")))
        assert flex_available(CPU, torch.bfloat16) == (False, "RuntimeError: bf16")
    assert len(flex_warnings(caplog)) == 1


def test_probe_checks_the_numbers_against_the_dense_reference(flex_state, monkeypatch):
    """Forward only (no backward on CPU): eager FlexAttention passes; one that computes wrong rows, as the
    compiled CPU template did for Linformer's key side, fails the probe."""
    monkeypatch.setattr(flex, "compiled_flex_attention", lambda: torch_flex.flex_attention)
    flex._probe_flex(CPU, torch.float32, backward=False)
    flex._probe_flex(CPU, torch.bfloat16, backward=False)

    def wrong_rows(q, k, v, **kw):
        out = torch_flex.flex_attention(q, k, v, **kw).clone()
        out[:, :, :8] = out[:, :, :8] + 1.0
        return out

    monkeypatch.setattr(flex, "compiled_flex_attention", lambda: wrong_rows)
    with pytest.raises(RuntimeError, match="forward differs from the dense reference"):
        flex._probe_flex(CPU, torch.float32, backward=False)


def test_devices_flex_does_not_train_on_are_not_probed(flex_state, monkeypatch, caplog):
    monkeypatch.setattr(flex, "_probe_flex", lambda *a, **k: pytest.fail("probed on the CPU"))
    with caplog.at_level(logging.WARNING, logger=flex.__name__):
        usable, why = flex_available(CPU, torch.float32)
    assert not usable and "cpu" in why and not flex_warnings(caplog)


@pytest.mark.parametrize("pe", PES)
def test_attention_backend_names_the_training_path(pe, cpu_as_cuda):
    """Real CPU: the dense paths. A device where FlexAttention is available: flex for bias PEs on flash and
    for Linformer, unless use_flex is off or attention dropout is on (FlexAttention has none)."""
    has_bias = build_model(tiny_model_cfg(pe, "flash")).attention_layers()[0][1].has_bias
    regular, flash, linformer = (build_model(tiny_model_cfg(pe, name)) for name in ("regular", "flash", "linformer"))
    cpu_as_cuda._VERDICTS[FLOAT] = (False, "RuntimeError: injected")
    assert attention_backend(regular, CPU) == "explicit"
    assert attention_backend(flash, CPU) == ("sdpa+bias-mask" if has_bias else "sdpa")
    assert attention_backend(linformer, CPU) == "linformer-dense"
    cpu_as_cuda._VERDICTS[FLOAT] = (True, None)
    assert attention_backend(regular, CPU) == "explicit"
    assert attention_backend(flash, CPU) == ("flex" if has_bias else "sdpa")
    assert attention_backend(torch.compile(linformer), CPU) == "flex"  # a compiled model's original module
    flash_without_flex = build_model(without_flex(tiny_model_cfg(pe, "flash")))
    assert attention_backend(flash_without_flex, CPU) == ("sdpa+bias-mask" if has_bias else "sdpa")
    assert attention_backend(build_model(tiny_model_cfg(pe, "linformer", dropout=0.1)), CPU) == "linformer-dense"


def test_attention_backend_takes_the_autocast_dtype(cpu_as_cuda):
    """Under bf16 autocast the attention runs in bf16: that dtype's verdict counts."""
    model = build_model(tiny_model_cfg("alibi", "flash"))
    cpu_as_cuda._VERDICTS[FLOAT] = (False, "RuntimeError: float32 only fails")
    cpu_as_cuda._VERDICTS[("cpu", None, torch.bfloat16)] = (True, None)
    assert attention_backend(model, CPU) == "sdpa+bias-mask"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_backend(model, CPU) == "flex"
    assert attention_backend(model, CPU, torch.bfloat16) == "flex"


@pytest.mark.parametrize("pe", ["alibi", "fire"])
@pytest.mark.parametrize("attention", ["flash", "linformer"])
def test_block_mask_is_built_once_for_every_layer_and_step(attention, pe, cpu_as_cuda, monkeypatch):
    """2 layers × 2 training forwards: one create_block_mask call, and the flex path's numbers are the
    dense path's."""
    cfg = tiny_model_cfg(pe, attention)
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    expected_logits, _ = dense_reference(cfg, idx)
    built = []
    create_block_mask = torch_flex.create_block_mask
    monkeypatch.setattr(torch_flex, "create_block_mask", lambda *a, **k: built.append(a) or create_block_mask(*a, **k))
    monkeypatch.setattr(flex, "compiled_flex_attention", eager_flex_on_detached_inputs)
    cpu_as_cuda._VERDICTS[FLOAT] = (True, None)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert attention_backend(model, CPU) == "flex"
    model.train()
    logits = [model(idx) for _ in range(2)][-1]
    assert len(built) == 1
    assert torch.allclose(logits, expected_logits, atol=1e-5)


def test_block_mask_key_tells_linformer_rules_of_the_same_shapes_apart(cpu_as_cuda, monkeypatch):
    """Chunks of 8 → 2 slots and of 16 → 4 slots: both 8 slots + 32 keys at T = 32, different rules."""
    monkeypatch.setattr(flex, "compiled_flex_attention", eager_flex_on_detached_inputs)
    cpu_as_cuda._VERDICTS[FLOAT] = (True, None)
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    for chunk_size, k in ((8, 2), (16, 4), (8, 2)):
        cfg = tiny_model_cfg("alibi", "linformer", attention={"name": "linformer", "chunk_size": chunk_size, "k": k})
        expected_logits, _ = dense_reference(cfg, idx)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        assert torch.allclose(model(idx), expected_logits, atol=1e-5), (chunk_size, k)
    assert len(cpu_as_cuda._BLOCK_MASKS) == 2


@pytest.mark.slow
def test_a_compiled_model_reads_the_verdict_in_its_graph(cpu_as_cuda):
    """Traced, the mechanisms read the remembered verdict (no graph break, no probe): a failed one gives the
    dense path inside the compiled model."""
    cfg = tiny_model_cfg("alibi", "flash")
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    cpu_as_cuda._VERDICTS[FLOAT] = (False, "RuntimeError: injected")
    expected_logits, _ = dense_reference(cfg, idx)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(idx)
    assert explained.graph_break_count == 0
    assert torch.allclose(torch.compile(model)(idx), expected_logits, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["flash", "linformer"])
def test_the_flex_path_with_its_cached_mask_traces_as_one_graph(attention, flex_state):
    """Traced, `flex_or_none` and the mask cache step aside (the mask is built in the graph): no graph break.
    Numbers for flash only: compiled on this CPU, Linformer's longer key side gives wrong rows (test_model)."""
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg("alibi", attention))
    mechanism, pe = model.attention_layers()[0]
    q, k, v = torch.randn(3, 2, 4, 32, 8).unbind(0)
    pos = torch.arange(32)

    def attend(q, k, v):
        return flex.flex_or_none(lambda: mechanism._flex_forward(q, k, v, pos, pos, pe), q)

    with torch.no_grad():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(attend)(q, k, v)
        got = torch.compile(attend)(q, k, v)
        expected = mechanism(q, k, v, pos, pos, pe)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    assert not flex._BLOCK_MASKS
    if attention == "flash":
        assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flex_is_available_and_used_on_this_gpu(flex_state):
    """On a GPU FlexAttention supports, the probe passes and alibi+flash trains on the flex path."""
    device = torch.device("cuda")
    assert flex_available(device, torch.bfloat16) == (True, None)
    model = build_model(tiny_model_cfg("alibi", "flash", n_embd=64)).to(device)  # head dim 16, flex's minimum
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert attention_backend(model, device) == "flex"
        idx = torch.randint(0, 97, (2, 32), device=device)
        _, loss = model.train()(idx, idx)
        loss.backward()
        assert attention_backend(model, device) == "flex"  # the forward did not fall back
    assert len(flex._BLOCK_MASKS) == 1 and torch.isfinite(loss)
