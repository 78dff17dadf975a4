"""`python -m src.export`: the transformers GPT-2 folder of a learned-PE model (loaded with no pegrid code, logits
equal to ours), the one line why other models have none, and a model card that says what was trained and measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from src.atomic import atomic_write_json  # noqa: E402
from src.chat.store import discover_models  # noqa: E402
from src.checkpoint import load_model, save_checkpoint  # noqa: E402
from src.data.tokenizer import get_tokenizer, padded_vocab_size  # noqa: E402
from src.export import export, transformers_gpt2  # noqa: E402
from src.export.__main__ import main as export_main  # noqa: E402
from src.export.transformers_gpt2 import TransformersExportError  # noqa: E402
from src.metrics import TOKENS, VAL_LOSS, extrapolation_context_key, extrapolation_loss_key  # noqa: E402
from src.model import build_model  # noqa: E402
from tests.conftest import tiny_model_cfg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEXT = "def f(x):\n    return x ** 2  # ünïcode, tabs\tand  spaces\n\nThe end."


def make_run(run_dir: Path, pe: str, attention: str, tokenizer: str = "gpt2", **model) -> Path:
    """A run dir as training leaves it: a checkpoint (an untrained model), summary.json and config.yaml."""
    cfg = tiny_model_cfg(pe, attention, vocab_size=padded_vocab_size(tokenizer), **model)
    torch.manual_seed(0)
    save_checkpoint(run_dir / "checkpoints", 7, build_model(cfg), cfg, {}, keep_last=1)
    atomic_write_json(run_dir / "summary.json", {
        "run_name": run_dir.name, "pe": pe, "attention": attention, "step": 7, TOKENS: 7168, "seed": 3,
        "git_commit": "0123456789ab", VAL_LOSS: 5.5, extrapolation_loss_key(1): 5.5, extrapolation_context_key(1): 32,
        extrapolation_loss_key(4): 6.25, extrapolation_context_key(4): 128})
    config = {"data": {"name": "hf", "hf_path": "HuggingFaceFW/fineweb-edu", "hf_name": "sample-10BT",
                       "tokenizer": tokenizer},
              "eval": {"val": {"num_tokens": 65536}, "extrapolation": {"num_tokens": 16384, "multipliers": [1, 4]},
                       "hellaswag": {"enabled": True, "limit": 500}}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


# Loads the folder in a fresh interpreter that imports nothing of pegrid, and saves transformers' logits.
_LOAD_WITH_TRANSFORMERS_ONLY = """
import json, sys, torch
from transformers import AutoTokenizer, GPT2LMHeadModel
folder, text, out = sys.argv[1:]
model = GPT2LMHeadModel.from_pretrained(folder).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
ids = tokenizer(text)["input_ids"][:model.config.n_positions]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]
torch.save({"ids": ids, "logits": logits, "eos": tokenizer.eos_token_id}, out)
print(json.dumps(sorted(m for m in sys.modules if m == "src" or m.startswith(("src.", "analysis")))))
"""


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer,attention,bias", [("gpt2", "flash", True), ("gpt2", "regular", False),
                                                      ("bytes", "flash", True)])
def test_a_learned_model_is_a_transformers_gpt2_with_our_logits(tmp_path, tokenizer, attention, bias):
    run = make_run(tmp_path / "run", "learned", attention, tokenizer, bias=bias)
    exported = export(run, tmp_path / "export")
    folder = exported.transformers
    assert folder == tmp_path / "export" / "transformers" and exported.no_transformers_reason is None
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert "auto_map" not in config  # no custom code to trust

    out = tmp_path / "theirs.pt"
    proc = subprocess.run([sys.executable, "-c", _LOAD_WITH_TRANSFORMERS_ONLY, str(folder), TEXT, str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []  # no pegrid module was imported
    theirs = torch.load(out)
    ours_tokenizer = get_tokenizer(tokenizer)
    assert theirs["ids"] == ours_tokenizer.encode_ordinary(TEXT)[:32] and theirs["eos"] == ours_tokenizer.eot_token
    model, _ = load_model(run)
    with torch.no_grad():
        ours = model(torch.tensor([theirs["ids"]]))[0]
    assert ours.shape == theirs["logits"].shape
    assert (ours - theirs["logits"]).abs().max() <= 1e-5

    # the chat lists the export once (its transformers/ copy is the same model), and the run
    assert discover_models(tmp_path) == [str(tmp_path / "export"), str(run)]
    card = (tmp_path / "export" / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "transformers"
    assert 'GPT2LMHeadModel.from_pretrained("ORG/REPO", subfolder="transformers")' in card


@pytest.mark.parametrize("pe,attention,why", [
    ("rope", "flash", "its PE (rope) has no learned position table"),
    ("alibi", "regular", "its PE (alibi) has no learned position table"),
    ("learned", "linformer", "GPT-2 has no place for its learned PE / linformer attention parameters"),
])
def test_other_models_get_no_transformers_folder_and_one_line_why(tmp_path, capsys, pe, attention, why):
    run = make_run(tmp_path / "run", pe, attention)
    stale = tmp_path / "export" / "transformers"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # left by an earlier export of another model
    assert export_main([str(run), str(tmp_path / "export")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("no transformers folder: transformers' GPT2LMHeadModel cannot hold this model: ")
    assert why in lines[-1] and len(lines) == 2
    assert not stale.exists()
    card = (tmp_path / "export" / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "pegrid"
    assert f"no `transformers/` folder: transformers' GPT2LMHeadModel cannot hold this model: {why}" in card


def test_a_folder_whose_logits_differ_is_not_kept(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path / "run", "learned", "flash")
    monkeypatch.setattr(transformers_gpt2, "max_logit_difference", lambda *args: 0.5)
    with pytest.raises(TransformersExportError, match="logits up to 5.00e-01 away"):
        export(run, tmp_path / "export")
    assert not (tmp_path / "export" / "transformers").exists()
    assert export_main([str(run), str(tmp_path / "export2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: transformers' GPT-2 gives logits") and err.count("\n") == 1


def test_the_card_names_data_tokenizer_tokens_budgets_commit_and_qualifies_extrapolation(tmp_path):
    run = make_run(tmp_path / "run", "alibi", "flash")
    card = (export(run, tmp_path / "export", transformers=False).folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["datasets"] == ["HuggingFaceFW/fineweb-edu"]
    cells = [line.strip().strip("|").split(" | ", 1) for line in card.splitlines() if line.startswith("| ")]
    rows = {cell[0].strip(): cell[1].strip() for cell in cells if len(cell) == 2 and cell[0].strip()}
    assert rows["training data"].startswith("`hf` (hf_path=HuggingFaceFW/fineweb-edu, hf_name=sample-10BT)")
    assert rows["tokenizer"] == "gpt2" and "GPT-2 BPE" in card
    assert rows["training tokens seen"] == "7,168" and rows["commit"] == "`0123456789ab`"
    assert rows["eval budgets"] == ("val loss on 65,536 tokens; extrapolation on 16,384 tokens per context (1/4×); "
                                    "HellaSwag on 500 items")
    assert rows["context"] == ("trained on 32 tokens; the PE takes longer inputs, measured loss 5.500 at 1× (32), "
                               "6.250 at 4× (128) (nats)")
    assert "extrapolates" not in card  # never the bare claim
    assert "no `transformers/` folder: --no-transformers was given" in card
