"""Chatting with trained models: generation (KV cache, context policy, sampling), export, the CLI, the
bounded model store, and the Streamlit app (AppTest and a real headless Chromium)."""

from __future__ import annotations

import gc
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import weakref
from pathlib import Path

import pytest
import torch
import yaml

from src.atomic import atomic_write_json
from src.chat.generate import Conversation, SamplingConfig, context_window, decode_stream, generate_tokens, sample
from src.chat.store import ModelStore, discover_models, load
from src.chat.terminal import main as chat_main
from src.checkpoint import load_model, save_checkpoint
from src.data.tokenizer import EOT_TOKEN, get_tokenizer
from src.export import export
from src.export.__main__ import main as export_main
from src.metrics import VAL_LOSS, label
from src.model import build_model
from src.training.trainer import train
from tests.conftest import ATTENTIONS, PES, ROOT, tiny_model_cfg
from tests.train_helpers import compose_train, tiny_overrides

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def real_vocab_cfg(pe: str, attention: str, **overrides) -> dict:
    """The tests' tiny model with GPT-2's vocabulary, so that <|endoftext|> (50256) is a valid input."""
    return tiny_model_cfg(pe, attention, vocab_size=50304, **overrides)


def fake_run(run_dir: Path, cfg: dict, seed: int = 0) -> Path:
    """A run dir as training leaves it (checkpoint + summary.json), with an untrained model: fast to make."""
    torch.manual_seed(seed)
    save_checkpoint(run_dir / "checkpoints", 1, build_model(cfg), cfg, {}, keep_last=1)
    atomic_write_json(run_dir / "summary.json", {"pe": cfg["pe"]["name"], "attention": cfg["attention"]["name"],
                                                 "run_name": run_dir.name, "step": 1, "val/loss": 10.8})
    return run_dir


def answer_text(model, prompt: str, cfg: SamplingConfig = GREEDY) -> str:
    conversation = Conversation.for_model(model)
    conversation.add_message(prompt)
    return "".join(decode_stream(generate_tokens(model, conversation, cfg)))


def seed_with_words(model, prompt: str, max_new_tokens: int) -> tuple[int, str, list[str]]:
    """A sampling seed for which the (barely trained) model's answer has words to look for, and the answer."""
    for seed in range(100):
        expected = answer_text(model, prompt, SamplingConfig(max_new_tokens=max_new_tokens, seed=seed))
        words = re.findall(r"[A-Za-z]{3,}", expected)
        if len(words) >= 2:
            return seed, expected, words
    raise AssertionError("no seed in 0..99 gives an answer with two words")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A REAL tiny run (2 steps, RoPE + flash) and its export folder."""
    root = tmp_path_factory.mktemp("trained")
    run_dir = root / "rope-run"
    train(compose_train(tiny_overrides(root / "data", steps=2, extra=["model/pe=rope"])), run_dir)
    return run_dir, export(run_dir, root / "exports" / "rope-flash").folder


# ----------------------------------------------------------------------------------------------- (a) KV cache


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("pe", PES)
def test_cached_greedy_generation_equals_uncached(pe, attention):
    """24 greedy tokens after a 24-token prompt: past block_size (32), and past the window, which slides."""
    torch.manual_seed(0)
    model = build_model(real_vocab_cfg(pe, attention)).eval()
    window = None if pe == "learned" else 40  # learned: max_context (32); the others: past block_size
    cached, uncached = (Conversation.for_model(model, window, use_cache=flag) for flag in (True, False))
    prompt = torch.randint(0, 50257, (24,)).tolist()
    tokens = []
    for conversation in (cached, uncached):
        conversation.append(prompt)
    for _ in range(24):
        logits = cached.next_logits(model)
        torch.testing.assert_close(logits, uncached.next_logits(model), atol=1e-4, rtol=1e-4)
        token = sample(logits, GREEDY, None)
        tokens.append(token)
        cached.append([token])
        uncached.append([token])
    assert len(cached.tokens) > cached.window  # the window slid
    # the policy: the model sees exactly the last `window` tokens
    seen = torch.tensor([cached.tokens[-cached.window:]])
    with torch.no_grad():
        torch.testing.assert_close(cached.next_logits(model), model(seen)[0, -1], atol=1e-4, rtol=1e-4)
    # and the streaming generator gives the same greedy tokens through the cache
    fresh = Conversation.for_model(model, window)
    fresh.append(prompt)
    assert list(generate_tokens(model, fresh, SamplingConfig(temperature=0, max_new_tokens=24))) == tokens


def test_context_window_follows_the_pe():
    learned = build_model(real_vocab_cfg("learned", "flash"))
    rope = build_model(real_vocab_cfg("rope", "flash"))
    assert context_window(learned) == 32 and context_window(learned, window=1000) == 32
    assert context_window(learned, window=16) == 16
    assert context_window(rope) == 64 and context_window(rope, window=1000) == 1000


# ------------------------------------------------------------------------------------------------ (b) sampling


def test_sampling_is_deterministic_by_seed():
    torch.manual_seed(0)
    model = build_model(real_vocab_cfg("alibi", "regular")).eval()

    def run(seed):
        conversation = Conversation.for_model(model)
        conversation.append([10, 11, 12])
        return list(generate_tokens(model, conversation, SamplingConfig(temperature=1.0, max_new_tokens=12,
                                                                       seed=seed)))

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()

    def support(**kwargs):
        generator = torch.Generator().manual_seed(0)
        cfg = SamplingConfig(temperature=1.0, **kwargs)
        return {sample(logits, cfg, generator) for _ in range(300)}

    assert support(top_k=0, top_p=1.0) == {0, 1, 2, 3}
    assert support(top_k=2, top_p=1.0) == {0, 1}
    assert support(top_k=0, top_p=0.7) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert support(top_k=0, top_p=0.85) == {0, 1, 2}
    assert support(top_k=3, top_p=0.6) == {0, 1}
    assert sample(logits, SamplingConfig(temperature=0), None) == 0


def test_padding_ids_are_never_sampled():
    """GPT-2's vocabulary is padded from 50257 to 50304 ids; the tokenizer cannot decode the padding."""
    logits = torch.zeros(50304)
    logits[50300] = 100.0
    generator = torch.Generator().manual_seed(0)
    assert sample(logits, SamplingConfig(temperature=0), None) < 50257
    assert all(sample(logits, SamplingConfig(temperature=2.0, top_k=0, top_p=1.0), generator) < 50257
               for _ in range(20))


class ScriptedLM(torch.nn.Module):
    """A stand-in model whose greedy continuation is `script`, then <|endoftext|>, then more tokens."""

    max_context = None

    def __init__(self, script):
        super().__init__()
        self.script = [*script, EOT_TOKEN, 42]
        self.config = type("Config", (), {"block_size": 64})()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, kv_cache=None):
        length = idx.size(1) if kv_cache is None else kv_cache.length + idx.size(1)
        if kv_cache is not None:
            kv_cache.length = length
        logits = torch.zeros(1, idx.size(1), 50304)
        logits[0, -1, self.script[min(length - 4, len(self.script) - 1)]] = 1.0  # 4 = EOT + a 3-token prompt
        return logits

    def new_kv_cache(self):
        return type("Cache", (), {"length": 0})()


def test_generation_stops_at_end_of_text():
    model = ScriptedLM([7, 8, 9])
    conversation = Conversation.for_model(model)
    conversation.append([1, 2, 3])
    assert list(generate_tokens(model, conversation, SamplingConfig(temperature=0, max_new_tokens=50))) == [7, 8, 9]
    assert conversation.tokens[-1] == EOT_TOKEN  # kept: the next message starts a new document
    conversation.add_message("Next")
    assert conversation.tokens[-2:] == [EOT_TOKEN, *get_tokenizer().encode_ordinary("Next")]


def test_streamed_text_never_splits_a_character():
    text = "a 犬 🦜"  # each character is split over three byte-level tokens
    tokens = get_tokenizer().encode_ordinary(text)
    pieces = list(decode_stream(tokens))
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)
    assert "犬" in pieces and len(tokens) > len(pieces)
    assert "".join(decode_stream(tokens[:-1])) == "a 犬 "  # a character cut off at the end is dropped


# -------------------------------------------------------------------------------------------------- (c) export


def test_export_round_trip_and_model_card(trained_run):
    run_dir, out = trained_run
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.yaml", "model.safetensors", "model_config.json", "summary.json"]
    original, _ = load_model(run_dir)
    exported = load(str(out)).model
    idx = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        assert torch.equal(original(idx), exported(idx))

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "pegrid" and front["license"] == "mit"
    assert {"pegrid", "gpt2", "pe-rope", "attention-flash"} <= set(front["tags"])
    summary = yaml.safe_load((run_dir / "summary.json").read_text())
    assert "| positional encoding | rope |" in card and "| attention | flash |" in card
    assert f"| {label(VAL_LOSS)} | {summary[VAL_LOSS]:.4f} |" in card
    assert summary["run_name"] in card and "the PE takes longer inputs" in card  # qualified, never a bare claim
    assert ("no `transformers/` folder: transformers' GPT2LMHeadModel cannot hold this model: its PE (rope) has no "
            "learned position table") in card


def test_export_rejects_a_bad_run_dir(tmp_path, capsys):
    assert export_main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert export_main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_cut_short_summary_neither_stops_chat_nor_gets_exported(tmp_path, capsys):
    run = fake_run(tmp_path / "run", tiny_model_cfg("rope", "flash", vocab_size=50304))  # fits GPT-2's vocabulary
    (run / "summary.json").write_text('{"val/loss": 10.')  # a run killed mid-write (or a hand edit)
    loaded = load(str(run))
    assert loaded.model is not None and loaded.metrics == {}
    assert export_main([str(run), str(tmp_path / "out")]) == 2
    assert "has no readable summary.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- (d) CLI


def test_chat_cli(trained_run, tmp_path):
    """One shot and the interactive loop on an export folder; offline Hub ids fail with one clear line.

    The four subprocesses run in parallel: each spends seconds importing torch.
    """
    _, out = trained_run
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    chat = [sys.executable, "-m", "src.chat"]
    runs = {
        "one_shot": (chat + ["--model", str(out), "--prompt", "The for statement", "--temperature", "0",
                             "--max-new-tokens", "8"], None, os.environ),
        "loop": (chat + ["--model", str(out), "--max-new-tokens", "3", "--seed", "1"], "Hello\n/reset\nAgain\n",
                 os.environ),
        "hub": (chat + ["--repo", "pegrid-org/grid", "--model", "rope-flash", "--prompt", "x"], None, offline),
        "hf": (chat + ["--hf", "gpt2", "--prompt", "x"], None, offline),
    }
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (cmd, _, env) in runs.items()}
    results = {name: proc.communicate(runs[name][1], timeout=120) + (proc.returncode,)
               for name, proc in procs.items()}

    stdout, stderr, rc = results["one_shot"]
    assert rc == 0, stderr
    assert stdout == answer_text(load(str(out)).model, "The for statement") + "\n"
    assert "pe=rope attention=flash" in stderr

    stdout, stderr, rc = results["loop"]
    assert rc == 0, stderr
    assert "(new conversation)" in stderr and stdout.count("> ") >= 3

    for name, looked_for in (("hub", ("pegrid-org/grid", "rope-flash/model.safetensors")),
                             ("hf", ("'gpt2'", "model.safetensors"))):
        stdout, stderr, rc = results[name]
        assert rc == 2 and stdout == ""
        assert "Traceback" not in stderr and stderr.startswith("error: could not get")
        assert len(stderr.strip().splitlines()) == 1 and all(s in stderr for s in looked_for)


def test_transformers_gpt2_route(tmp_path):
    """`hf:` specs go through transformers and from_hf_gpt2: the logits are HF's (a tiny local GPT-2 here)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)).eval()
    hf_model.save_pretrained(tmp_path / "gpt2-tiny")
    loaded = ModelStore().get(f"hf:{tmp_path / 'gpt2-tiny'}")
    assert loaded.info["pe"] == "learned" and loaded.info["max_context"] == 64 and loaded.metrics == {}
    idx = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(idx), hf_model(idx).logits, atol=1e-4, rtol=1e-4)


def test_chat_cli_unknown_model(tmp_path, capsys):
    assert chat_main(["--model", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "no model at" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- (e) model store


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


@pytest.mark.slow
def test_store_keeps_one_model_resident(tmp_path):
    """One exported ~27 MB model per PE, loaded in turn: each load frees the previous model."""
    exports = []
    for seed, pe in enumerate(PES):
        cfg = dict(n_layer=2, n_head=4, n_embd=128, block_size=64, vocab_size=50304,
                   pe={"name": pe}, attention={"name": "flash"})
        exports.append(export(fake_run(tmp_path / pe, cfg, seed), tmp_path / "exports" / pe).folder)
    model_bytes = (exports[0] / "model.safetensors").stat().st_size
    assert model_bytes > 20e6
    assert discover_models(tmp_path / "exports") == sorted(str(e) for e in exports)

    def load_all(store):
        """Load every export in turn; return weakrefs to the models and the RSS growth after the first."""
        refs, rss = [], []
        gc.collect()
        for path in exports:
            loaded = store.get(str(path))
            assert loaded.info["pe"] == path.name
            refs.append(weakref.ref(loaded.model))
            del loaded
            rss.append(rss_bytes())
        return refs, max(rss) - rss[0]

    store = ModelStore(max_resident=1)
    refs, growth = load_all(store)
    assert store.resident == [str(exports[-1])]
    assert [ref() is None for ref in refs] == [True] * (len(PES) - 1) + [False]
    assert growth < 1.5 * model_bytes, f"RSS grew by {growth / 1e6:.0f} MB"
    del store
    gc.collect()

    # The same measurement sees the growth when the budget allows them all.
    unbounded = ModelStore(max_resident=len(PES))
    refs, growth = load_all(unbounded)
    assert all(ref() is not None for ref in refs) and growth > 4 * model_bytes


# ---------------------------------------------------------------------------------------------- (f) Streamlit


@pytest.fixture(scope="module")
def app_runs_dir(trained_run, tmp_path_factory):
    """The trained RoPE export and an untrained ALiBi one, as the app's models root."""
    runs = tmp_path_factory.mktemp("app_runs")
    shutil.copytree(trained_run[1], runs / "rope-flash")
    fake_run(runs / "alibi-regular", real_vocab_cfg("alibi", "regular"))
    return runs


def test_streamlit_app(app_runs_dir, monkeypatch):
    pytest.importorskip("streamlit", reason="the `chat` extra is not installed: pip install -e '.[chat]'")
    from streamlit.testing.v1 import AppTest

    from app import verbatim

    monkeypatch.setenv("PEGRID_MODELS_ROOT", str(app_runs_dir))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception
    models = [str(app_runs_dir / "alibi-regular"), str(app_runs_dir / "rope-flash")]
    assert at.selectbox[0].options == models
    seed, expected, _ = seed_with_words(load(models[1]).model, "The for statement", max_new_tokens=8)
    at.selectbox[0].set_value(models[1])
    at.number_input[1].set_value(8)  # max new tokens
    at.number_input[2].set_value(seed)
    at.run()
    assert "PE **rope** · attention **flash**" in at.caption[0].value

    at.chat_input[0].set_value("The for statement").run()
    assert not at.exception
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    assert at.chat_message[1].html[0].value == verbatim(expected)

    at.text_input[1].set_value("scaling.type=yarn scaling.factor=4").run()  # RoPE extended, a new conversation
    assert not at.exception and not at.chat_message
    assert "PE **rope+yarn×4** · attention **flash**" in at.caption[0].value
    at.text_input[1].set_value("scaling.typo=1").run()
    assert "model.pe.scaling.typo=1 does not fit the checkpoint's 'rope' PE" in at.error[0].value
    at.text_input[1].set_value("").run()

    at.selectbox[0].set_value(models[0]).run()  # switching model starts a new conversation
    assert not at.exception and not at.chat_message
    assert "PE **alibi** · attention **regular**" in at.caption[0].value
    at.chat_input[0].set_value("Hello").run()
    assert [m.name for m in at.chat_message] == ["user", "assistant"]


# -------------------------------------------------------------------------------------- (g) a real browser

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def streamlit_server(trained_run, tmp_path):
    pytest.importorskip("streamlit", reason="the `chat` extra is not installed: pip install -e '.[chat]'")
    runs = tmp_path / "runs"
    shutil.copytree(trained_run[1], runs / "rope-flash")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port",
         str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        # one thread, as this test process: the same float sums, so the same seeded answer
        cwd=ROOT, env={**os.environ, "PEGRID_MODELS_ROOT": str(runs), "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
def test_chat_in_a_real_browser(streamlit_server, trained_run, tmp_path):
    pytest.importorskip("playwright", reason="the `chat` extra is not installed: pip install -e '.[chat]'")
    from playwright.sync_api import sync_playwright

    # indented lines and markdown syntax: the page must show both messages as written
    prompt = "The for statement:\n\n    for x in *items*:\n        print(x)  # a_b"
    seed, expected, _ = seed_with_words(load(str(trained_run[1])).model, prompt, max_new_tokens=12)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(streamlit_server)
        for label, value in (("Max new tokens", "12"), ("Seed (empty = random)", str(seed))):
            field = page.get_by_label(label)
            field.fill(value)
            field.press("Enter")
        page.wait_for_timeout(1000)  # let the rerun with the new settings finish
        box = page.get_by_test_id("stChatInputTextArea")
        box.fill(prompt)
        box.press("Enter")
        answer = page.get_by_test_id("stChatMessage").nth(1)
        deadline = time.monotonic() + 60
        while expected.strip() not in answer.inner_text():  # the whole answer, exactly as generated
            assert time.monotonic() < deadline, f"expected {expected!r} in {answer.inner_text()!r}"
            page.wait_for_timeout(200)
        assert prompt in page.get_by_test_id("stChatMessage").nth(0).inner_text()
        page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
        browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 10_000
