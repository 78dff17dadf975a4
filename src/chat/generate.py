"""Text generation for chatting: sampling, a KV-cached conversation, and a PE-aware context policy.

A `Conversation` is the running token sequence of a chat in the model's tokenizer (it starts with the
tokenizer's EOT, which precedes every document in training: GPT-2's <|endoftext|>, or byte 0 for
`data.tokenizer=bytes`) plus the KV cache of the part the model currently sees. `generate_tokens` streams
sampled token ids and appends them to the conversation; `generate_text` streams decoded text.

Context policy — what the model sees when the conversation is longer than it can or should attend to:
- a PE with a fixed number of positions (`model.max_context` is not None: learned) sees the last
  `max_context` tokens;
- a PE that extrapolates sees a sliding window of the last `window` tokens (default 2 x block_size): it
  could take any length, but quality degrades beyond the training context, and cost grows with length.
Either way it is an exact sliding window: once the window is full, each new token is appended by
re-prefilling the last `window` tokens into a fresh cache (positions restart at 0, so an absolute PE never
sees a position it was not trained on). Until then, the cache makes each new token cost one position.
Greedy and seeded generation are therefore identical with and without the cache (tests/test_chat.py).

The conversation does not hold the model: a model evicted from the `ModelStore` is really freed even while
a chat session keeps its conversation.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from src.data.tokenizer import DEFAULT_TOKENIZER, VOCAB_SIZE, get_tokenizer


@dataclass
class SamplingConfig:
    """temperature 0 = greedy; top_k 0 and top_p 1.0 = no restriction; seed None = a fresh random seed."""

    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    max_new_tokens: int = 200
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


def context_window(model, window: int | None = None) -> int:
    """Most tokens the model attends to: max_context for a fixed-position PE, else `window` (2 x block_size)."""
    if window is not None and window < 1:
        raise ValueError(f"window must be positive, got {window}")
    if model.max_context is not None:
        return model.max_context if window is None else min(window, model.max_context)
    return 2 * model.config.block_size if window is None else window


class Conversation:
    """The tokens of a chat so far, and the KV cache of the window the model currently sees.

    use_cache=False recomputes the whole window for every token: the reference the cache is tested against.
    `tokenizer` is the name of the model's tokenizer (`LoadedModel.tokenizer`).
    """

    def __init__(self, window: int, use_cache: bool = True, tokenizer: str = DEFAULT_TOKENIZER):
        self.window = window
        self.use_cache = use_cache
        self.tokenizer = get_tokenizer(tokenizer)
        self.tokens: list[int] = [self.tokenizer.eot_token]
        self._cache = None
        self._cache_start = 0  # index in `tokens` of the first cached token

    @classmethod
    def for_model(cls, model, window: int | None = None, use_cache: bool = True,
                  tokenizer: str = DEFAULT_TOKENIZER) -> Conversation:
        return cls(context_window(model, window), use_cache, tokenizer)

    def append(self, ids: Iterable[int]) -> None:
        """Add tokens; they are fed to the model lazily, by the next `next_logits`."""
        self.tokens.extend(ids)

    def add_message(self, text: str) -> None:
        """Append a user's message. These are base LMs: a message is text for the model to continue, and
        a conversation is one running document, with turns set apart as paragraphs ("\n\n") unless the
        model ended the previous document with EOT."""
        separator = "" if self.tokens[-1] == self.tokenizer.eot_token else "\n\n"
        self.append(self.tokenizer.encode_ordinary(separator + text))

    @torch.no_grad()
    def next_logits(self, model) -> Tensor:
        """Logits [vocab] for the token after `tokens`, seeing at most the last `window` tokens."""
        start = max(0, len(self.tokens) - self.window)
        device = next(model.parameters()).device
        if not self.use_cache:
            idx = torch.tensor([self.tokens[start:]], device=device)
            return model(idx)[0, -1]
        if self._cache is None or start != self._cache_start:  # first call, or the window slid: re-prefill
            self._cache, self._cache_start = model.new_kv_cache(), start
        new = self.tokens[self._cache_start + self._cache.length:]
        return model(torch.tensor([new], device=device), kv_cache=self._cache)[0, -1]


def sample(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None, n_vocab: int = VOCAB_SIZE) -> int:
    """One token id from logits [vocab]: greedy at temperature 0, else top-k then top-p (nucleus) sampling.

    Ids from the tokenizer's `n_vocab` on (GPT-2's 50257 are padded to 50304 for fast matmuls) are never
    picked: the tokenizer cannot decode them.
    """
    logits = logits[:n_vocab].float().cpu()
    if cfg.temperature == 0:
        return int(logits.argmax())
    logits = logits / cfg.temperature
    if 0 < cfg.top_k < logits.numel():
        kth = torch.topk(logits, cfg.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the ones ranked above it already reach top_p (the top token always stays)
        drop = cumulative - sorted_logits.softmax(-1) >= cfg.top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def generate_tokens(model, conversation: Conversation, cfg: SamplingConfig) -> Iterator[int]:
    """Stream up to `max_new_tokens` sampled ids, appending each to the conversation.

    Stops at the tokenizer's EOT, which is appended (the next message starts a new document) but not yielded.
    """
    tokenizer = conversation.tokenizer
    generator = torch.Generator()
    if cfg.seed is None:
        generator.seed()
    else:
        generator.manual_seed(cfg.seed)
    for _ in range(cfg.max_new_tokens):
        token = sample(conversation.next_logits(model), cfg, generator, tokenizer.n_vocab)
        conversation.append([token])
        if token == tokenizer.eot_token:
            return
        yield token


def decode_stream(tokens: Iterable[int], tokenizer: str = DEFAULT_TOKENIZER) -> Iterator[str]:
    """Decode ids to text piece by piece; a character split across tokens (GPT-2 BPE pieces, or the 2-4
    bytes of one character with `bytes`) is emitted once it is whole.

    Invalid byte sequences show as U+FFFD; a character left incomplete when generation stops is dropped.
    """
    tokenizer = get_tokenizer(tokenizer)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        text = decoder.decode(tokenizer.decode_single_token_bytes(token))
        if text:
            yield text


def generate_text(model, conversation: Conversation, prompt: str, cfg: SamplingConfig) -> Iterator[str]:
    """Append `prompt` to the conversation and stream the model's continuation as text."""
    conversation.add_message(prompt)
    return decode_stream(generate_tokens(model, conversation, cfg), conversation.tokenizer.name)
