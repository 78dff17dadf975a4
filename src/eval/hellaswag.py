"""HellaSwag (Zellers et al. 2019) zero-shot accuracy, scored as in Karpathy's build-nanogpt (hellaswag.py).

Each of the 10,042 items of the official validation file is a context, 4 candidate endings and the
index of the right one (`label`). The model reads tokens(ctx) + tokens(" " + ending) for every ending;
an ending's score is the model's cross-entropy on the ending tokens only (the context is given, not
scored). The prediction is the ending with the lowest summed loss (`acc`) or the lowest mean loss per
ending token (`acc_norm`, which does not favour short endings). Completion style: no few-shot prompt,
no answer letters, no special tokens.

Reference: GPT-2 124M (OpenAI's weights, `from src.model import from_hf_gpt2`) scores acc 0.2859 and
acc_norm 0.2955 on all 10,042 items with this protocol (build-nanogpt; the EleutherAI harness, which
scores differently, reports 0.2892 / 0.3114). A random guesser scores 0.25.

Here, beyond build-nanogpt: several items share one forward pass (rows padded on the right, which a
causal model never sees from earlier positions), sequences longer than the model's max_context keep
their last max_context tokens, and under torch.distributed item i is scored by rank i % world_size and
the counts are all-reduced (every rank must call evaluate_hellaswag).
"""

import functools
import hashlib
import json
import os
import tempfile
import urllib.request
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from src.data import get_tokenizer
from src.eval.config import HellaSwagConfig
from src.eval.val_loss import evaluating, rank_and_world_size, sum_across_ranks
from src.metrics import HELLASWAG_ACC, HELLASWAG_ACC_NORM, HELLASWAG_N

FILE_NAME = "hellaswag_val.jsonl"
DEFAULT_CACHE_DIR = HellaSwagConfig.cache_dir
DOWNLOAD_TIMEOUT_S = 10
FIX = "set eval.hellaswag.path=/local/hellaswag_val.jsonl, or skip it with eval.hellaswag.enabled=false"


class HellaSwagUnavailableError(RuntimeError):
    """The HellaSwag file could not be found or downloaded; the message says what was tried and the fix."""


@dataclass(frozen=True)
class Example:
    context: list[int]  # tokens of ctx
    endings: list[list[int]]  # tokens of " " + ending, 4 of them
    label: int  # index of the right ending


def ensure_hellaswag(cfg: HellaSwagConfig) -> Path:
    """The local HellaSwag val file: cfg.path, or the copy in cache_dir, downloaded from cfg.url if absent
    and kept only if its sha256 is cfg.sha256 (a file of one's own at cfg.path is taken as it is).

    Call it before training to fail in seconds, not at the first evaluation, when the file cannot be had.
    """
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not path.is_file():
            raise HellaSwagUnavailableError(f"HellaSwag file {path.absolute()} does not exist: fix "
                                            f"eval.hellaswag.path=..., or skip it with eval.hellaswag.enabled=false")
        return path
    cache_dir = cfg.cache_dir
    if cache_dir == DEFAULT_CACHE_DIR and os.environ.get("PEGRID_DATA_DIR"):
        cache_dir = os.path.join(os.environ["PEGRID_DATA_DIR"], "hellaswag")
    path = Path(cache_dir).expanduser().absolute() / FILE_NAME
    if not path.is_file():
        _download(cfg.url, path, cfg.sha256)
    return path


def _download(url: str, path: Path, sha256: str) -> None:
    """Download to a temporary file next to `path`, check its sha256, then rename: `path` is absent or complete
    and the pinned file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256.lower():
            Path(tmp).unlink()
            raise HellaSwagUnavailableError(
                f"HellaSwag downloaded from {url} has sha256 {digest.hexdigest()}, expected {sha256} "
                f"(eval.hellaswag.sha256), so it was deleted: {FIX}")
        os.replace(tmp, path)
    except OSError as err:  # URLError, HTTPError, timeouts and disk errors are all OSErrors
        Path(tmp).unlink(missing_ok=True)
        reason = (str(getattr(err, "reason", err)).strip() or type(err).__name__).splitlines()[0]
        raise HellaSwagUnavailableError(f"could not download HellaSwag from {url} to {path} ({reason}): "
                                        f"{FIX}") from err


@functools.lru_cache(maxsize=2)
def _tokenized(path: str) -> tuple[Example, ...]:
    enc = get_tokenizer()
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            try:
                item = json.loads(line)
                examples.append(Example(context=enc.encode_ordinary(item["ctx"]),
                                        endings=[enc.encode_ordinary(" " + e) for e in item["endings"]],
                                        label=int(item["label"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise HellaSwagUnavailableError(f"{path} line {line_number} is not a HellaSwag item "
                                                f"({type(err).__name__}: {err}): delete it to download it again, "
                                                f"or {FIX}") from err
    return tuple(examples)


def load_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """The items of a HellaSwag jsonl file, tokenized (cached per path), the first `limit` of them."""
    return list(_tokenized(str(Path(path).absolute()))[:limit])


def _batch(examples: list[Example], max_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens and ending mask, [4 * len(examples), T], right-padded with zeros, each row's last max_len."""
    rows, masks = [], []
    for ex in examples:
        for ending in ex.endings:
            row, mask = ex.context + ending, [0] * len(ex.context) + [1] * len(ending)
            start = 0 if max_len is None else max(0, len(row) - max_len)  # left truncation
            rows.append(row[start:])
            masks.append(mask[start:])
    width = max(len(row) for row in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for i, (row, row_mask) in enumerate(zip(rows, masks)):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = torch.tensor(row_mask, dtype=mask.dtype)
    return tokens, mask


def predict(model: nn.Module, examples: list[Example], device: str | torch.device = "cpu",
            autocast: Callable[[], AbstractContextManager] = nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """The ending the model picks for each item by summed and by mean ending loss, in one forward pass."""
    tokens, mask = _batch(examples, model.max_context)
    tokens, mask = tokens.to(device), mask.to(device)
    with autocast():
        logits = model(tokens)
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(),
                             reduction="none").view(len(tokens), -1)
    ending_mask = mask[:, 1:]  # the loss at position t is that of token t + 1
    sum_loss = (losses * ending_mask).sum(dim=1)
    mean_loss = sum_loss / ending_mask.sum(dim=1).clamp(min=1)
    return sum_loss.view(-1, 4).argmin(dim=1), mean_loss.view(-1, 4).argmin(dim=1)


def score_items(model: nn.Module, examples: list[Example], *, rank: int = 0, world_size: int = 1,
                batch_size: int = 4, device: str | torch.device = "cpu",
                autocast: Callable[[], AbstractContextManager] = nullcontext,
                progress: bool = False) -> tuple[int, int, int]:
    """(correct by summed loss, correct by mean loss, items scored) over items i with i % world_size == rank."""
    mine = examples[rank::world_size]
    correct = correct_norm = 0
    with evaluating(model), tqdm(total=len(mine), desc="hellaswag", unit="item", disable=not progress) as bar:
        for first in range(0, len(mine), batch_size):
            chunk = mine[first : first + batch_size]
            pred, pred_norm = predict(model, chunk, device, autocast)
            labels = torch.tensor([ex.label for ex in chunk], device=pred.device)
            correct += (pred == labels).sum().item()
            correct_norm += (pred_norm == labels).sum().item()
            bar.update(len(chunk))
    return correct, correct_norm, len(mine)


def evaluate_hellaswag(model: nn.Module, cfg: HellaSwagConfig, device: str | torch.device,
                       autocast: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, float | int]:
    """HellaSwag acc / acc_norm / n of `model` (a GPT-2-vocabulary model), sharded over DDP ranks."""
    n_vocab = get_tokenizer().n_vocab
    if model.config.vocab_size < n_vocab:
        raise ValueError(f"HellaSwag needs GPT-2 token ids (up to {n_vocab - 1}); the model has "
                         f"vocab_size={model.config.vocab_size}")
    path = ensure_hellaswag(cfg)
    examples = load_examples(path, cfg.limit)
    if not examples:
        raise ValueError(f"no HellaSwag items to score in {path} (eval.hellaswag.limit={cfg.limit})")
    rank, world_size = rank_and_world_size()
    counts = score_items(model, examples, rank=rank, world_size=world_size, batch_size=cfg.batch_size,
                         device=device, autocast=autocast, progress=rank == 0)
    correct, correct_norm, n = sum_across_ranks(list(counts), device)
    return {HELLASWAG_ACC: correct / n, HELLASWAG_ACC_NORM: correct_norm / n, HELLASWAG_N: int(n)}
