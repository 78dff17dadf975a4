"""Bad input gets one line on stderr, exit status 2, no traceback and nothing written (issue #13, item 8).

A few cases run end to end through each entrypoint (`python -m src.train`, `src.eval`, `src.data.prepare`);
the rest call the preflight check directly, which is what both the Hydra callback and train() run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.data.sources import DataUnavailableError
from src.errors import ConfigError
from src.eval.hellaswag import HellaSwagUnavailableError
from src.preflight import check_inputs
from src.train import remove_unused_run_dir
from src.training.run_lock import RunLock
from src.training.trainer import train
from tests.conftest import ROOT
from tests.train_helpers import compose_train, tiny_overrides

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture
def binary_file(tmp_path) -> Path:
    path = tmp_path / "program.bin"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))  # 0x80 at offset 136 is no UTF-8 start byte
    return path


def run_module(module: str, *args: str, cwd: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != "HYDRA_FULL_ERROR"}
    env.update(PYTHONPATH=str(ROOT), PEGRID_DATA_DIR=str(cwd / "data"), **extra_env)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def assert_one_line(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr


def written(root: Path) -> list[str]:
    """Everything under root but the inputs the test wrote there itself."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name not in ("afile", "program.bin"))


# --- end to end -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    (["runs_dir={tmp}/afile/sub"], "afile is a file, not a directory: set runs_dir="),
    pytest.param(["trainer.device=cuda"], "CUDA is not available", marks=NO_CUDA),
    (["model.vocab_size=100"], "model.vocab_size=100 cannot hold the gpt2 tokenizer's 50257 ids"),
    (["data=text_file", "data.path={tmp}/program.bin"], "program.bin is not UTF-8 text (byte 0x80 at offset 136)"),
    (["eval.extrapolation.multipliers=[0]"], "eval.extrapolation.multipliers must be whole numbers >= 1"),
    (["trainer.micro_batch_size=big"], "trainer.micro_batch_size must be positive (a whole number of sequences) or "
                                       "'auto' (the largest that fits), got 'big'"),
])
def test_train_cli_reports_bad_input_in_one_line_and_writes_nothing(overrides, message, tmp_path, binary_file):
    (tmp_path / "afile").touch()
    args = [o.format(tmp=tmp_path) for o in overrides]
    proc = run_module("src.train", f"runs_dir={tmp_path / 'runs'}", *args, cwd=tmp_path)
    assert_one_line(proc, message)
    assert written(tmp_path) == []  # no run dir (not even .hydra/), no runs_dir, no data cache


@pytest.mark.slow
def test_hydra_full_error_shows_the_traceback_and_still_writes_nothing(tmp_path):
    proc = run_module("src.train", f"runs_dir={tmp_path / 'runs'}", "trainer.lr=-1", cwd=tmp_path,
                      HYDRA_FULL_ERROR="1")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "ConfigError: trainer.lr must be positive, got -1.0" in proc.stderr
    assert written(tmp_path) == []


@pytest.mark.slow
def test_bad_input_found_after_hydra_made_the_run_dir_removes_it(tmp_path):
    """A HellaSwag download that fails is only found in train(), after Hydra has written <run>/.hydra/."""
    proc = run_module("src.train", f"runs_dir={tmp_path / 'runs'}", "run_name=late", "eval.hellaswag.enabled=true",
                      "eval.hellaswag.url=http://127.0.0.1:9/hellaswag_val.jsonl",
                      f"eval.hellaswag.cache_dir={tmp_path / 'hellaswag'}", cwd=tmp_path)
    assert_one_line(proc, "could not download HellaSwag")
    assert not (tmp_path / "runs" / "late").exists()


@pytest.mark.slow
def test_eval_cli_checks_its_config_before_loading_anything(tmp_path):
    proc = run_module("src.eval", f"ckpt={tmp_path / 'nope'}", "eval.extrapolation.multipliers=[0]", cwd=tmp_path)
    assert_one_line(proc, "eval.extrapolation.multipliers must be whole numbers >= 1")


@pytest.mark.slow
def test_prepare_cli_reports_a_binary_file_in_one_line(tmp_path, binary_file):
    proc = run_module("src.data.prepare", "data=text_file", f"data.path={binary_file}", cwd=tmp_path)
    assert_one_line(proc, f"data.path={binary_file} is not UTF-8 text")
    assert written(tmp_path) == []


# --- the preflight check ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    # trainer: every numeric field
    (["trainer.lr=-1"], "trainer.lr must be positive, got -1.0"),
    (["trainer.lr=nan"], "trainer.lr must be positive, got nan"),
    (["trainer.eps=0"], "trainer.eps must be positive"),
    (["trainer.max_steps=0"], "trainer.max_steps must be positive"),
    (["trainer.micro_batch_size=0"], "trainer.micro_batch_size must be positive"),
    (["trainer.micro_batch_size=-1"], "trainer.micro_batch_size must be positive (a whole number of sequences) or "
                                      "'auto' (the largest that fits), got -1"),
    (["trainer.micro_batch_size=big"], "trainer.micro_batch_size must be positive (a whole number of sequences) or "
                                       "'auto' (the largest that fits), got 'big'"),
    (["trainer.log_every=0"], "trainer.log_every must be positive"),
    (["trainer.warmup_steps=-1"], "trainer.warmup_steps must be >= 0"),
    (["trainer.eval_every=-1"], "trainer.eval_every must be >= 0"),
    (["trainer.ckpt_every=-5"], "trainer.ckpt_every must be >= 0"),
    (["trainer.keep_last=-1"], "trainer.keep_last must be >= 0"),
    (["trainer.grad_clip=-1"], "trainer.grad_clip must be >= 0"),
    (["trainer.weight_decay=-0.1"], "trainer.weight_decay must be >= 0"),
    (["trainer.beta1=1.0"], "trainer.beta1 must be in [0, 1)"),
    (["trainer.beta2=-0.5"], "trainer.beta2 must be in [0, 1)"),
    (["trainer.min_lr_ratio=2"], "trainer.min_lr_ratio (the final lr as a fraction of trainer.lr) must be in [0, 1]"),
    (["trainer.seed=-1"], "trainer.seed must be in [0, 2**32)"),
    (["trainer.total_batch_tokens=1000"], "must be a multiple of micro_batch_size x block_size x world_size = 2048"),
    (["trainer.micro_batch_size=auto", "trainer.total_batch_tokens=1000"],
     "must be a multiple of block_size x world_size (trainer.micro_batch_size=auto) = 128: e.g. "
     "trainer.total_batch_tokens=1024"),
    # trainer: the device against this machine
    pytest.param(["trainer.device=cuda"], "trainer.device=cuda but CUDA is not available on this machine",
                 marks=NO_CUDA),
    (["trainer.device=cuda:99"], "trainer.device=cuda:99 but "),
    (["trainer.device=gpu"], "trainer.device=gpu is not a device: use auto, cpu, cuda, cuda:N or mps"),
    # data
    (["data.val_fraction=1.0"], "data.val_fraction (the fraction of documents held out for validation) must be in"),
    (["data.val_fraction=-0.1"], "data.val_fraction"),
    (["data.val_tokens=0"], "data.val_tokens must be positive or null"),
    (["data.max_docs=0"], "data.max_docs must be positive or null"),
    (["data.shard_tokens=0"], "data.shard_tokens must be positive"),
    (["data.max_docs=1"], "data=embedded has 1 document(s) and validation takes 1"),
    (["data.val_fraction=0.999"], "data=embedded has 79 document(s) and validation takes 79"),
    (["data=text_file"], "data=text_file needs a file: add data.path="),
    (["data=hf"], "data=hf needs a dataset: add data.hf_path="),
    (["data=hf", "data.hf_path=json", "data.streaming=true"], "set data.val_tokens="),
    (["data.tokenizer=klingon"], "unknown tokenizer 'klingon'"),
    (["data.cache_dir={tmp}/afile/cache"], "afile is a file, not a directory: set data.cache_dir="),
    # eval
    (["eval.extrapolation.multipliers=[1,0]"], "eval.extrapolation.multipliers must be whole numbers >= 1"),
    (["eval.extrapolation.num_tokens=0"], "eval.extrapolation.num_tokens must be positive"),
    (["eval.extrapolation.batch_size=0"], "eval.extrapolation.batch_size must be positive"),
    (["eval.val.num_tokens=-1"], "eval.val.num_tokens must be positive"),
    (["eval.val.batch_size=0"], "eval.val.batch_size must be positive"),
    (["eval.hellaswag.limit=0"], "eval.hellaswag.limit must be positive"),
    (["eval.hellaswag.batch_size=0"], "eval.hellaswag.batch_size must be positive"),
    # model, and the PE / attention against it
    (["model.vocab_size=100"], "model.vocab_size=100 cannot hold the gpt2 tokenizer's 50257 ids"),
    (["data.tokenizer=bytes", "model.vocab_size=100"], "cannot hold the bytes tokenizer's 256 ids"),
    (["model.n_head=5"], "model.n_embd (128) must be divisible by model.n_head (5)"),
    (["model.dropout=1.0"], "model.dropout must be in [0, 1)"),
    (["model/pe=rope", "model.n_head=8", "model.n_embd=136"], "rope needs an even head dimension"),
    (["model/pe=rope", "model.pe.base=-1"], "model.pe.base must be > 1"),
    (["model/pe=fire", "model.pe.mlp_width=0"], "model.pe.mlp_width must be positive"),
    (["model/pe=kerple", "model.pe.variant=cubic"], "'log' or 'power'"),
    (["model/attention=linformer", "model.attention.k=500"], "smaller than model.attention.chunk_size"),
    # where the run goes
    (["runs_dir={tmp}/afile/sub"], "afile is a file, not a directory: set runs_dir="),
    (["runs_dir=/proc/pegrid"], "/proc does not let this process create directories"),
])
def test_preflight_names_the_value_and_writes_nothing(overrides, message, tmp_path):
    (tmp_path / "afile").touch()
    args = [o.format(tmp=tmp_path) for o in overrides]
    cfg = compose_train([f"data.cache_dir={tmp_path / 'data'}", f"runs_dir={tmp_path / 'runs'}", *args])
    with pytest.raises(ConfigError) as raised:
        check_inputs(cfg, Path(cfg.runs_dir) / "run")
    assert message in str(raised.value)
    assert written(tmp_path) == []


def test_text_file_sources_are_checked_before_tokenising(tmp_path, binary_file):
    def check(path: Path) -> None:
        check_inputs(compose_train(["data=text_file", f"data.path={path}", f"data.cache_dir={tmp_path / 'data'}"]))

    with pytest.raises(ConfigError, match=rf"data.path={binary_file} is not UTF-8 text \(byte 0x80 at offset 136\)"):
        check(binary_file)
    with pytest.raises(DataUnavailableError, match="does not exist"):
        check(tmp_path / "missing.txt")
    one_paragraph = tmp_path / "one.txt"
    one_paragraph.write_text("A single paragraph, so nothing is left to train on.\n")
    with pytest.raises(ConfigError, match="data=text_file has 1 document"):
        check(one_paragraph)
    two_paragraphs = tmp_path / "two.txt"
    two_paragraphs.write_text("One paragraph.\n\nAnd a second one, held out.\n")
    check(two_paragraphs)
    assert not (tmp_path / "data").exists()


def test_a_missing_local_hellaswag_file_is_bad_input(tmp_path):
    cfg = compose_train([f"data.cache_dir={tmp_path}", "eval.hellaswag.enabled=true",
                         f"eval.hellaswag.path={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(HellaSwagUnavailableError, match="eval.hellaswag.enabled=false"):
        check_inputs(cfg)


def test_good_input_passes_and_writes_nothing(tmp_path):
    cfg = compose_train(tiny_overrides(tmp_path / "data"))
    check_inputs(cfg, tmp_path / "runs" / "run")
    assert written(tmp_path) == []


def test_train_checks_before_it_writes_or_prepares_anything(tmp_path):
    with pytest.raises(ConfigError, match="trainer.lr must be positive"):
        train(compose_train(tiny_overrides(tmp_path / "data", extra=["trainer.lr=-1"])), tmp_path / "run")
    assert written(tmp_path) == []


def test_only_a_run_dir_without_a_record_is_removed(tmp_path):
    def hydra_made(name: str) -> Path:
        run_dir = tmp_path / name
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "config.yaml").write_text("{}")
        (run_dir / "train.log").write_text("")
        return run_dir

    empty = hydra_made("empty")
    remove_unused_run_dir(empty, "train.log")
    assert not empty.exists()
    with_record = hydra_made("with_record")
    (with_record / "summary.json").write_text("{}")
    remove_unused_run_dir(with_record, "train.log")
    assert (with_record / "summary.json").exists()
    in_use = hydra_made("in_use")
    with RunLock(in_use):  # another process's run, just starting
        remove_unused_run_dir(in_use, "train.log")
    assert (in_use / ".hydra").exists()


@pytest.mark.parametrize(("requested", "local_rank", "expected"), [
    ("cuda", 1, "cuda:1"),  # this rank's GPU, as auto (was cuda for every rank: DDP ranks shared cuda:0)
    ("auto", 1, "cuda:1"),
    ("cuda:0", 1, "cuda:0"),  # an explicit index is kept
])
def test_cuda_means_this_ranks_gpu(requested, local_rank, expected, monkeypatch):
    from src.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(requested, local_rank) == torch.device(expected)
