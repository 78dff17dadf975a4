"""pegrid models in lm-evaluation-harness (src/lm_eval/), offline: local task YAMLs over jsonl files written here.

- the adapter's loglikelihoods (plain and rolling, in windows) equal the project's own scoring (val_loss.py);
- generation: the KV-cached batch equals uncached greedy decoding, and stops at stop sequences;
- `--model pegrid` and lm-eval's own `--model hf` (on the export's transformers folder) give the same metrics,
  for both tokenizers (GPT-2 BPE and bytes).
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from src.atomic import atomic_write_json  # noqa: E402
from src.checkpoint import save_checkpoint  # noqa: E402
from src.data.config import DataConfig  # noqa: E402
from src.data.sources import open_source  # noqa: E402
from src.eval.val_loss import score_windows, sliding_windows  # noqa: E402
from src.export import export  # noqa: E402
from src.lm_eval.adapter import PegridLM, PegridLMError  # noqa: E402
from src.metrics import extrapolation_loss_key  # noqa: E402
from src.model import build_model  # noqa: E402
from src.training.trainer import train  # noqa: E402
from tests.conftest import ROOT, tiny_model_cfg  # noqa: E402
from tests.train_helpers import compose_train, tiny_overrides  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TASKS = ["pegrid_choice", "pegrid_rolling", "pegrid_generate"]


def held_out_documents() -> list[str]:
    """The embedded corpus's last documents: its validation split, never trained on."""
    return list(open_source(DataConfig()).texts)[-4:]


def write_tasks(folder: Path) -> Path:
    """Three lm-eval tasks, one per request type, on jsonl files of held-out text: a 2-way choice between a
    paragraph's true continuation and one from another document, whole documents scored rolling, and the next
    words generated until a newline."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    docs = held_out_documents()
    paragraphs = [[p for p in d.split("\n\n") if len(p) > 150 and " " in p[60:100]] for d in docs]
    choice, generate = [], []
    for i, own in enumerate(paragraphs):
        others = [p for j, ps in enumerate(paragraphs) if j != i for p in ps]
        for p in own[:6]:
            cut = p.index(" ", 60)  # contexts end before a space: lm-eval puts " " between context and choice
            true, other = p[cut + 1:cut + 41], rng.choice(others)
            other_cut = other.index(" ", 60)
            label = rng.randint(0, 1)
            pair = [true, other[other_cut + 1:other_cut + 41]]
            choice.append({"context": p[:cut], "choices": pair if label == 0 else pair[::-1], "label": label})
            generate.append({"prompt": p[:cut + 1], "answer": p[cut + 1:].split(" ")[0]})
    rolling = [{"text": d[:1500]} for d in docs]
    specs = {
        "pegrid_choice": ("choice", choice, "output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
                          "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
                          "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
        "pegrid_rolling": ("rolling", rolling, "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
                           "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n"
                           "  - metric: byte_perplexity\n  - metric: bits_per_byte\n"),
        "pegrid_generate": ("generate", generate, "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\n"
                            "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\" \", \"\\n\"]\n"
                            "  max_gen_toks: 12\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n"),
    }
    for task, (name, rows, body) in specs.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}.yaml").write_text(f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                             f"    test: {data}\ntest_split: test\n{body}")
    return folder


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module", params=["bytes", "gpt2"])
def learned_export(request, tmp_path_factory):
    """A REAL learned-PE training run (bytes: 150 steps of the CPU study's model; gpt2: 2 steps of the tiny one)
    and its export, transformers folder included."""
    root = tmp_path_factory.mktemp(f"learned-{request.param}")
    if request.param == "bytes":
        overrides = [f"data.cache_dir={root / 'data'}", "experiment=study_cpu", "model/pe=learned",
                     "trainer.max_steps=150", "eval.val.num_tokens=2048", "eval.extrapolation.num_tokens=2048",
                     "eval.extrapolation.multipliers=[1,2]", "eval.extrapolation.stride=null",
                     "eval.details.enabled=false"]
    else:
        overrides = tiny_overrides(root / "data", steps=2, extra=["model/pe=learned"])
    run_dir = root / "run"
    train(compose_train(overrides), run_dir)
    exported = export(run_dir, root / "export")
    assert exported.transformers is not None, exported.no_transformers_reason
    return request.param, run_dir, exported


def own_total(model, tokens: list[int], context_len: int, starts, first_scored) -> float:
    """−(the sum of next-token losses) by the project's own scorer, src/eval/val_loss.py."""
    losses = score_windows(model, np.array(tokens), context_len, np.asarray(starts), np.asarray(first_scored),
                           batch_size=4, device="cpu")
    return -float(losses.total.sum())


def test_loglikelihoods_equal_the_projects_own_scoring(learned_export):
    tokenizer, run_dir, _ = learned_export
    lm = PegridLM(pretrained=str(run_dir), batch_size=3)
    model, window, tok = lm.model, lm.max_length, lm.tokenizer
    docs = held_out_documents()
    pairs = [(d[:200], d[200:260]) for d in docs] + [(docs[0][:5000], docs[0][5000:5030])]  # one truncated
    results = lm.loglikelihood([Instance("loglikelihood", {}, pair, 0) for pair in pairs], disable_tqdm=True)
    for (context, continuation), (log_prob, greedy) in zip(pairs, results):
        ctx, cont = lm._encode_pair(context, continuation)  # lm-eval's split (a context's trailing spaces move on)
        whole = (ctx + cont)[-(window + 1):]
        expected = own_total(model, whole, len(whole) - 1, [0], [len(whole) - 1 - len(cont)])
        assert log_prob == pytest.approx(expected, rel=1e-6, abs=1e-5)
        with torch.no_grad():
            argmax = model(torch.tensor([whole[:-1]]))[0, -len(cont):].argmax(-1).tolist()
        assert greedy == (argmax == cont)

    texts = [docs[1][:3 * window + 17], docs[2][:window // 2]]  # four windows (the last one partly scored), one
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0) for t in texts],
                                       disable_tqdm=True)
    for text, total in zip(texts, rolling):
        ids = tok.encode_ordinary(text)
        tokens = [tok.eot_token, *ids]
        if len(ids) >= window:
            starts, first = sliding_windows(len(ids), window, window)  # the non-overlapping layout of val_loss.py
            expected = own_total(model, tokens, window, starts, first)
        else:
            expected = own_total(model, tokens, len(ids), [0], [0])
        assert total == pytest.approx(expected, rel=1e-6)
    assert tokenizer == lm.loaded.tokenizer


def test_generation_is_batched_cached_greedy_and_stops(learned_export):
    _, run_dir, _ = learned_export
    lm = PegridLM(pretrained=str(run_dir), batch_size=4)
    tok, model = lm.tokenizer, lm.model
    docs = held_out_documents()
    # equal token lengths, so they share a batch and one KV cache
    contexts = [tok.decode(tok.encode_ordinary(d)[100:110]) for d in docs]
    assert len({len(tok.encode_ordinary(c)) for c in contexts}) == 1
    texts = lm.generate_until([Instance("generate_until", {}, (c, {"until": [], "max_gen_toks": 9}), 0)
                               for c in contexts], disable_tqdm=True)
    for context, text in zip(contexts, texts):
        ids = tok.encode_ordinary(context)
        with torch.no_grad():
            for _ in range(9):  # greedy, without a cache, one sequence at a time: the reference
                nxt = int(model(torch.tensor([ids]))[0, -1, :tok.n_vocab].argmax())
                if nxt == tok.eot_token:
                    break
                ids.append(nxt)
        assert text == tok.decode(ids[len(tok.encode_ordinary(context)):])
    stop = texts[0][2:4]
    [cut] = lm.generate_until([Instance("generate_until", {}, (contexts[0], {"until": [stop], "max_gen_toks": 9}), 0)],
                              disable_tqdm=True)
    assert cut == texts[0].split(stop)[0] and stop not in cut


def test_bad_model_args_fail_in_one_line(learned_export):
    _, run_dir, _ = learned_export
    lm = PegridLM(pretrained=str(run_dir))
    with pytest.raises(PegridLMError, match="positions"):
        PegridLM(pretrained=str(run_dir), max_length=lm.max_length + 1)  # a learned table has no more rows
    with pytest.raises(PegridLMError, match="whole number"):
        PegridLM(pretrained=str(run_dir), batch_size="many")


def test_an_extrapolating_pe_may_read_longer_windows_and_says_so(tmp_path, caplog):
    cfg = tiny_model_cfg("alibi", "flash", vocab_size=50304)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, build_model(cfg), cfg, {}, keep_last=1)
    atomic_write_json(tmp_path / "run" / "summary.json", {"run_name": "alibi", extrapolation_loss_key(2): 4.25})
    window = 2 * cfg["block_size"]
    with caplog.at_level(logging.WARNING):
        lm = PegridLM(pretrained=str(tmp_path / "run"), max_length=window)
    assert f"windows of {window} tokens, longer than the model (PE alibi) was trained on {cfg['block_size']}" \
        in caplog.text
    assert "measured loss 4.250 at 2× (nats)" in caplog.text
    text = held_out_documents()[0][:2000]
    ids = lm.tokenizer.encode_ordinary(text)
    [total] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    starts, first = sliding_windows(len(ids), window, window)
    assert len(starts) > 2 and total == pytest.approx(own_total(lm.model, [lm.tokenizer.eot_token, *ids], window,
                                                                starts, first), rel=1e-6)


def evaluate(model, model_args, tasks: Path) -> dict:
    results = simple_evaluate(model=model, model_args=model_args, tasks=TASKS, device="cpu", batch_size=4,
                              task_manager=TaskManager(include_path=str(tasks)), log_samples=False)
    return {task: {k: v for k, v in metrics.items() if "stderr" not in k and k != "alias"}
            for task, metrics in results["results"].items()}


@pytest.mark.slow
def test_pegrid_and_lm_evals_own_hf_model_give_the_same_metrics(learned_export, tasks):
    _, run_dir, exported = learned_export
    ours = evaluate(PegridLM(pretrained=str(exported.folder), batch_size=4), None, tasks)
    theirs = evaluate("hf", {"pretrained": str(exported.transformers), "dtype": "float32"}, tasks)
    assert ours.keys() == theirs.keys() == set(TASKS)
    for task in TASKS:
        assert ours[task].keys() == theirs[task].keys()
        for metric, value in ours[task].items():
            assert value == pytest.approx(theirs[task][metric], rel=1e-5), (task, metric)
    assert ours["pegrid_rolling"]["bits_per_byte,none"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("learned_export", ["bytes"], indirect=True)  # one tokenizer is enough for the CLI
def test_the_command_line_takes_lm_evals_options(learned_export, tasks, tmp_path):
    """`python -m src.lm_eval` is lm-eval's CLI (--tasks, --include_path, --limit, --output_path ...) with `pegrid`
    registered; a bad model path, or a Hub id without the network, is one line and exit status 2."""
    _, run_dir, _ = learned_export
    out = tmp_path / "results"
    argv = [sys.executable, "-m", "src.lm_eval", "--model", "pegrid",
            "--model_args", f"pretrained={run_dir},device=cpu", "--tasks", "pegrid_choice",
            "--include_path", str(tasks), "--limit", "8", "--output_path", str(out)]
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [written] = out.glob("**/results_*.json")
    results = json.loads(written.read_text())
    assert results["config"]["model"] == "pegrid" and results["n-samples"]["pegrid_choice"]["effective"] == 8
    assert 0 <= results["results"]["pegrid_choice"]["acc,none"] <= 1

    for model, error in ((tmp_path / "missing", f"error: no model at {tmp_path / 'missing'}"),
                         ("org/pegrid-model", "error: could not get 'model.safetensors' from the Hugging Face Hub")):
        argv[argv.index("--model_args") + 1] = f"pretrained={model}"
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(error), proc.stderr[-500:]
