"""Chat and app integrity (issue #13, item 9): the terminal chat's commands, local paths never taken for Hub
ids, model text shown verbatim in the app, the app's models root, and exports/ kept out of git."""

from __future__ import annotations

import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import huggingface_hub
import pytest

from src.chat import terminal as chat
from src.chat.generate import SamplingConfig
from src.chat.store import LoadedModel, ModelLoadError, load, local_path
from src.export import export, model_card
from src.metrics import (
    HELLASWAG_ACC_NORM,
    TRAIN_LOSS,
    VAL_LOSS,
    extrapolation_context_key,
    extrapolation_loss_key,
    label,
)
from src.model import ATTENTION_REGISTRY, PE_REGISTRY, build_model
from tests.conftest import ROOT
from tests.test_chat import fake_run, real_vocab_cfg

CFG = real_vocab_cfg("rope", "flash")


# ------------------------------------------------------------------------------------- terminal commands


def test_help_and_unknown_commands_never_reach_the_model(monkeypatch, capsys):
    lines = iter(["/help", "/frobnicate now", "//etc holds the config", "Hello", "/reset", "/quit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    sent = []
    monkeypatch.setattr(chat, "answer", lambda loaded, conversation, text, sampling: sent.append(text))
    chat.chat_loop(LoadedModel("tiny", build_model(CFG), Path(".")), None, SamplingConfig())

    assert sent == ["/etc holds the config", "Hello"]
    err = capsys.readouterr().err
    listed = [line.split()[0] for line in err.splitlines() if line.startswith("  /")]
    assert listed == ["/help", "/reset", "/quit", "//text"]
    assert "\nunknown command /frobnicate: /help lists the commands\n" in err
    assert "(new conversation)" in err


# ---------------------------------------------------------------------------------- local path or Hub id


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """snapshot_download replaced by a local snapshot folder (no network here); records each call."""
    snapshot = tmp_path / "snapshot"
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return snapshot, calls


@pytest.mark.parametrize("spec", [
    "outputs/grid/nonexistent",  # a project folder, even where it does not exist yet
    "exports/rope-flash",
    "./org/repo", "/org/repo", "~/org/repo",  # spelled as paths
    "org/repo/sub/deeper", "org/repo/",  # more than ORG/REPO[/NAME]
    "org/repo/model.safetensors", "org/repo/model_config.json",  # a file
    "mydir/repo", "mydir/a/b",  # the first name exists here
    "org\\repo", "org/re..po", "org/-repo",  # not names the Hub allows
    "nothing",  # no ORG/
    "hf:./gpt2-tiny", "hf:mydir/gpt2", "hf:a/b/c",
])
def test_a_path_is_never_a_hub_id(spec, hub, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "mydir" / "a").mkdir(parents=True)
    assert local_path(spec) is not None
    with pytest.raises(ModelLoadError, match=r"^no model at \S+: expected a ") as err:
        load(spec)
    assert "\n" not in str(err.value) and hub[1] == []


@pytest.mark.parametrize("spec, repo_id, patterns, folder", [
    ("pegrid-org/grid/rope-flash", "pegrid-org/grid", ["rope-flash/*"], "rope-flash"),
    ("pegrid-org/rope-flash", "pegrid-org/rope-flash", None, ""),
    ("EleutherAI/pythia-1.4b", "EleutherAI/pythia-1.4b", None, ""),  # a dot is no file suffix
])
def test_a_hub_id_goes_to_the_hub(spec, repo_id, patterns, folder, hub, monkeypatch, tmp_path):
    snapshot, calls = hub
    export(fake_run(tmp_path / "run", CFG), snapshot / folder)
    monkeypatch.chdir(tmp_path)  # where `outputs` and `pegrid-org` do not exist
    assert local_path(spec) is None
    loaded = load(spec)
    assert calls == [(repo_id, patterns)] and loaded.source == snapshot / folder and loaded.info["pe"] == "rope"


def test_no_network_fails_at_once_in_one_line(monkeypatch):
    def offline(repo_id, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    for spec, what in (("pegrid-org/grid/rope-flash", "'rope-flash/model.safetensors'"),
                       ("hf:gpt2", "config.json and model.safetensors")):
        with pytest.raises(ModelLoadError) as err:
            load(spec)
        message = str(err.value)
        assert message.startswith(f"could not get {what} from the Hugging Face Hub repo")
        assert "Name or service not known" in message and "\n" not in message


def test_chat_cli_mistyped_run_dir(hub, monkeypatch, tmp_path, capsys):
    """`--model outputs/grid/nonexistent` is a mistyped path, whether or not outputs/grid exists."""
    monkeypatch.chdir(tmp_path)
    for existing in (None, tmp_path / "outputs" / "grid"):
        if existing:
            existing.mkdir(parents=True)
        assert chat.main(["--model", "outputs/grid/nonexistent", "--prompt", "x"]) == 2
        err = capsys.readouterr().err
        assert err == ("error: no model at outputs/grid/nonexistent: expected a run dir (with checkpoints/step_*/), "
                       "a checkpoint dir or an export folder (model.safetensors + model_config.json) there\n")
    assert hub[1] == []


# ------------------------------------------------------------------------------------------------ the app


@pytest.fixture
def app_test(monkeypatch):
    pytest.importorskip("streamlit", reason="the `chat` extra is not installed: pip install -e '.[chat]'")
    from streamlit.testing.v1 import AppTest

    return lambda: AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()


def shown(element) -> str:
    """The text an st.html element shows, checking that it is one element that keeps whitespace as written."""
    parser = HTMLParser(convert_charrefs=True)
    tags, texts = [], []
    parser.handle_starttag = lambda tag, attrs: tags.append((tag, attrs))
    parser.handle_data = texts.append
    parser.feed(element.value)
    parser.close()
    assert len(tags) == 1 and "white-space: pre-wrap" in dict(tags[0][1]).get("style", ""), element.value
    return "".join(texts)


def test_app_shows_model_text_verbatim(app_test, tmp_path, monkeypatch):
    """Indented lines, markdown and HTML in the model's text are shown as written, not as a code block
    with backslash escapes (what markdown-escaping showed). The browser test looks at the rendering."""
    model_text = "Indented:\n\n    for x in range(3):\n        print(x * 2)  # a_b *c* $5 <b>not bold</b>\n"
    prompt = "a prompt_with *markdown*:\n    indented"  # (chat_input strips the ends)
    monkeypatch.setattr("src.chat.generate.generate_text",
                        lambda model, conversation, text, sampling: iter([model_text[:9], model_text[9:]]))
    fake_run(tmp_path / "rope-flash", CFG)
    monkeypatch.setenv("PEGRID_MODELS_ROOT", str(tmp_path))
    at = app_test()
    at.chat_input[0].set_value(prompt).run()
    for _ in range(2):  # as answered, and as the history shown on the next run
        assert not at.exception
        user, assistant = at.chat_message
        assert [shown(h) for h in user.html] == [prompt] and [shown(h) for h in assistant.html] == [model_text]
        assert not user.markdown and not assistant.markdown and not assistant.text
        at.run()


def test_app_loads_local_models_only_from_its_root(app_test, tmp_path, monkeypatch):
    root = tmp_path / "root"
    fake_run(root / "inside", CFG)
    fake_run(tmp_path / "outside", CFG)
    (root / "escape").symlink_to(tmp_path / "outside")
    monkeypatch.setenv("PEGRID_MODELS_ROOT", str(root))
    at = app_test()
    assert at.selectbox[0].options == [str(root / "inside")]  # not the symlink out

    for spec in (str(tmp_path / "outside"), f"{root}/../outside", str(root / "escape"), "hf:/etc", "/nowhere/x"):
        at.text_input(key="hub").set_value(spec).run()
        assert not at.exception
        assert [e.value for e in at.error] == [
            f"refused: {spec} is outside the models root ({root}); the server sets it with PEGRID_MODELS_ROOT"]
        assert not at.chat_input  # nothing loaded, nothing to chat with

    at.text_input(key="hub").set_value(f"{root}/../root/inside").run()  # .. that stays in the root
    assert not at.error and "PE **rope**" in at.main.caption[0].value


def test_app_models_root_defaults_to_outputs_and_exports(app_test, tmp_path, monkeypatch):
    monkeypatch.delenv("PEGRID_MODELS_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    for folder in ("outputs/run", "exports/rope-flash", "elsewhere/run"):
        fake_run(tmp_path / folder, CFG)
    at = app_test()
    assert at.selectbox[0].options == ["outputs/run", "exports/rope-flash"]
    at.text_input(key="hub").set_value("elsewhere/run").run()
    assert at.error[0].value.startswith("refused: elsewhere/run is outside the models root (outputs, exports)")


# ------------------------------------------------------------------------------------ model card, imports


def test_model_card_labels_and_counts_come_from_their_one_source():
    """Labels from src/metrics.py, the grid's size from the registries, every template placeholder filled, and
    the extrapolation losses in multiplier order (x16 after x2) with the context each was measured at."""
    summary = {"run_name": "r", "step": 3, VAL_LOSS: 5.0, TRAIN_LOSS: 5.5, HELLASWAG_ACC_NORM: 0.25,
               extrapolation_loss_key(16): 7.0, extrapolation_context_key(16): 1024,
               extrapolation_loss_key(2): 6.0, extrapolation_context_key(2): 128,
               extrapolation_loss_key(4): None, "perf/mfu": 0.4}
    card = model_card(LoadedModel("r", build_model(CFG), Path("."), summary), license="apache-2.0")
    assert "$" not in card and "license: apache-2.0" in card
    assert f"pegrid ({len(PE_REGISTRY.names())} positional encodings x {len(ATTENTION_REGISTRY.names())} " in card
    rows = [line.split(" | ")[0].lstrip("| ") for line in card.splitlines() if line.startswith("| ")]
    assert rows[-5:] == [label(VAL_LOSS), label(extrapolation_loss_key(2), context=128),
                         label(extrapolation_loss_key(16), context=1024), label(HELLASWAG_ACC_NORM), label(TRAIN_LOSS)]
    assert f"| {label(extrapolation_loss_key(16), context=1024)} | 7.0000 |" in card
    assert "loss at 16× context = 1,024 tokens (nats)" in card


def test_chat_imports_nothing_from_training():
    """The chat, the export and the Streamlit page need a model, not the trainer (src/run_record.py and
    src/device.py are the neutral modules they share with it)."""
    pytest.importorskip("streamlit")
    code = ("import sys, runpy; import src.export, src.chat.terminal, src.chat.store, src.chat.generate; "
            "runpy.run_path('app.py', run_name='imported'); "
            "print(sorted(m for m in sys.modules if m.startswith('src.training')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------- git


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_exports_are_ignored_by_git():
    ignored = subprocess.run(["git", "check-ignore", "-q", "exports/rope-flash/model.safetensors"], cwd=ROOT)
    assert ignored.returncode == 0
