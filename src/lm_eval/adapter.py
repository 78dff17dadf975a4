"""pegrid models inside EleutherAI's lm-evaluation-harness: the `pegrid` model type (`PegridLM`).

`pretrained` is anything `src.chat.store.load` takes: a run dir, a checkpoint dir, an export folder, a Hub id
(ORG/REPO[/NAME]) or `hf:ID`. The tokenizer is the run's own (`data.tokenizer`: GPT-2 BPE or bytes).

Scoring matches the project's own (src/eval/val_loss.py): the same forward, log-softmax over the model's whole
(padded) vocabulary in fp32, per-token log-probabilities summed in float64.
- `loglikelihood`: context + continuation, left-truncated to `max_length` + 1 tokens (lm-eval's HF model does
  the same); requests are batched longest first and right-padded (a causal model's logits at a position do not
  depend on later tokens, so padding changes nothing).
- `loglikelihood_rolling`: a document is scored in disjoint windows of `max_length` tokens, each predicting the
  tokens after the previous window's (lm-eval's `get_rolling_token_windows`, as its HF model): every token once,
  the first with the EOT before it as context.
- `generate_until`: greedy or sampled (`src.chat.generate.sample`), with the KV cache, until a stop sequence,
  EOT or `max_gen_toks`; the context keeps its last `max_length − max_gen_toks` tokens (as lm-eval's HF model).
  Requests whose contexts have the same length run as one batch (the model has no padding mask, so only equal
  lengths share a batch exactly).

`max_length`: the model's context by default (block_size, or the learned PE's table). A PE that extrapolates may
be given a longer window (`max_length=2048`); a warning says so, with the run's measured extrapolation losses.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import lm_eval.models  # noqa: F401 - lm-eval's own models: it registers them only into an empty registry
import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from src.chat.generate import SamplingConfig, sample
from src.chat.store import load
from src.data.tokenizer import get_tokenizer

log = logging.getLogger(__name__)
MODEL_NAME = "pegrid"


class PegridLMError(ValueError):
    """A bad --model_args value or a request the model cannot score; one line, fit to show a user."""


def _as_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise PegridLMError(f"--model_args {name}= must be a whole number, got {value!r}") from None
    if number < 1:
        raise PegridLMError(f"--model_args {name}= must be at least 1, got {number}")
    return number


@register_model(MODEL_NAME)
class PegridLM(TemplateLM):
    def __init__(self, pretrained: str, device: str = "cpu", batch_size: int | str = 8, max_length: int | None = None,
                 max_batch_size: int | None = None, **unused: Any) -> None:
        super().__init__()
        if unused:
            log.warning("pegrid ignores --model_args %s", ", ".join(sorted(unused)))
        if str(batch_size).startswith("auto"):
            batch_size = max_batch_size or 8  # no automatic search: the model is small, a fixed batch is fine
            log.warning("pegrid: batch_size=auto is not supported; using %d", batch_size)
        self.batch_size = _as_int("batch_size", batch_size)
        self._device = torch.device(device)
        if self._device.type == "cuda" and not torch.cuda.is_available():  # lm-eval's CLI defaults to cuda:0
            log.warning("pegrid: no CUDA device here, evaluating on the CPU (pass --device cpu to say so)")
            self._device = torch.device("cpu")
        self.loaded = load(str(pretrained), str(self._device))
        self.model = self.loaded.model.eval()
        self.tokenizer = get_tokenizer(self.loaded.tokenizer)
        self.max_length = self._window(max_length)

    def _window(self, requested: int | str | None) -> int:
        """Tokens the model reads at once: its context, or longer for a PE that extrapolates (with a warning)."""
        model, block_size = self.model, self.model.config.block_size
        trained = model.max_context or block_size
        if requested is None:
            return trained
        window = _as_int("max_length", requested)
        if model.max_context is not None and window > model.max_context:
            raise PegridLMError(f"max_length={window} is longer than this model's {model.max_context} positions "
                             f"(its PE, {model.pe_config.name}, has no more); use max_length<={model.max_context}")
        if window > block_size:
            log.warning("pegrid: scoring in windows of %d tokens, longer than the model (PE %s) was %s", window,
                        model.pe_config.name, self.loaded.context)
        return window

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None):
        """--model_args win over the CLI's own --device/--batch_size (whose device defaults to cuda:0), where lm-eval
        would pass both and fail with "multiple values for keyword argument"."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None):
        return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

    # ----------------------------------------------------------------------------------------- lm-eval's interface

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_token

    @property
    def tokenizer_name(self) -> str:
        return f"pegrid-{self.tokenizer.name}"

    @property
    def max_gen_toks(self) -> int:
        return 256

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode_ordinary(string)

    def tok_decode(self, tokens: Iterable[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding yields the continuation) per request."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        inputs = []
        for index, (request, context, continuation) in enumerate(requests):
            if not 1 <= len(continuation) <= self.max_length:
                raise PegridLMError(f"a continuation of {len(continuation)} tokens cannot be scored in a window of "
                                    f"{self.max_length}; it must be 1 to max_length tokens")
            whole = (context + continuation)[-(self.max_length + 1):]
            inputs.append((index, request, whole[:-1], len(continuation)))
        inputs.sort(key=lambda item: -len(item[2]))  # longest first: a batch pads to its first row
        batch_size = override_bs or self.batch_size
        for first in tqdm(range(0, len(inputs), batch_size), disable=disable_tqdm, desc="pegrid loglikelihood"):
            batch = inputs[first:first + batch_size]
            width = len(batch[0][2])
            ids = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
            for row, (_, _, tokens, _) in enumerate(batch):
                ids[row, :len(tokens)] = torch.tensor(tokens)
            logits = self.model(ids.to(self._device))
            for row, (index, request, tokens, n_continuation) in enumerate(batch):
                target = torch.tensor(requests[index][2][-n_continuation:])
                # only the continuation's positions: a full [batch, T, 50304] log-softmax would hold GBs
                scored = F.log_softmax(logits[row, len(tokens) - n_continuation:len(tokens)].float(), dim=-1).cpu()
                total = float(scored.gather(-1, target[:, None]).double().sum())
                answer = (total, bool((scored.argmax(-1) == target).all()))
                results[index] = answer
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            rolling = utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                      prefix_token=self.prefix_token_id,
                                                      max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(utils.make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (log_prob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[index] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, list[int]]]] = defaultdict(list)
        for index, (context, gen_kwargs) in enumerate(request.args for request in requests):
            settings = self._generation_settings(gen_kwargs)
            tokens = self.tok_encode(context)[-(self.max_length - settings["max_gen_toks"]):]
            groups[(len(tokens), repr(sorted(settings.items())))].append((index, tokens))
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="pegrid generate_until")
        for members in groups.values():
            settings = self._generation_settings(requests[members[0][0]].args[1])
            for first in range(0, len(members), self.batch_size):
                batch = members[first:first + self.batch_size]
                for (index, _), text in zip(batch, self._generate([tokens for _, tokens in batch], settings)):
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
                progress.update(len(batch))
        progress.close()
        return results

    # -------------------------------------------------------------------------------------------------- generation

    def _generation_settings(self, gen_kwargs: dict | None) -> dict:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen_toks = _as_int("max_gen_toks", kwargs.pop("max_gen_toks", self.max_gen_toks))
        if max_gen_toks >= self.max_length:
            raise PegridLMError(f"max_gen_toks={max_gen_toks} leaves no room for a context in {self.max_length} tokens")
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
        settings = {"until": tuple(until), "max_gen_toks": max_gen_toks,
                    "temperature": temperature if do_sample or temperature > 0 else 0.0,
                    "top_k": int(kwargs.pop("top_k", 0) or 0), "top_p": float(kwargs.pop("top_p", 1.0) or 1.0)}
        if kwargs:
            log.warning("pegrid ignores gen_kwargs %s", ", ".join(sorted(kwargs)))
        return settings

    @torch.no_grad()
    def _generate(self, contexts: list[list[int]], settings: dict) -> list[str]:
        """Continue equal-length contexts together, with one KV cache; each text cut at its first stop sequence."""
        cfg = SamplingConfig(temperature=settings["temperature"], top_k=settings["top_k"], top_p=settings["top_p"],
                             max_new_tokens=settings["max_gen_toks"])
        generator = torch.Generator().manual_seed(1234)  # lm-eval seeds its own RNGs; sampling here is reproducible
        cache = self.model.new_kv_cache()
        step_input = torch.tensor(contexts, device=self._device)
        generated: list[list[int]] = [[] for _ in contexts]
        done = [False] * len(contexts)
        for _ in range(settings["max_gen_toks"]):
            logits = self.model(step_input, kv_cache=cache)[:, -1]
            next_tokens = [sample(row, cfg, generator, self.tokenizer.n_vocab) for row in logits]
            for row, token in enumerate(next_tokens):
                if done[row]:
                    continue
                if token == self.eot_token_id:
                    done[row] = True
                    continue
                generated[row].append(token)
                if settings["until"] and any(stop in self.tok_decode(generated[row]) for stop in settings["until"]):
                    done[row] = True
            if all(done):
                break
            step_input = torch.tensor(next_tokens, device=self._device)[:, None]
        return [self._cut(self.tok_decode(tokens), settings["until"]) for tokens in generated]

    @staticmethod
    def _cut(text: str, until: tuple[str, ...]) -> str:
        for stop in until:
            text = text.split(stop, 1)[0]
        return text
