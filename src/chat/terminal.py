"""Chat with a trained model in the terminal: `python -m src.chat --model NAME_OR_PATH`.

    python -m src.chat --model outputs/<run>                  # a run dir, checkpoint dir or export folder
    python -m src.chat --model ORG/REPO                       # an export folder uploaded to the Hub
    python -m src.chat --repo ORG/REPO --model rope-flash     # the export folder rope-flash/ of a Hub repo
    python -m src.chat --hf gpt2                              # OpenAI's GPT-2 through transformers
    python -m src.chat --model outputs/<run> --prompt "Text to continue" --temperature 0   # one shot
    python -m src.chat --model outputs/<rope run> --pe scaling.type=yarn --pe scaling.factor=4 --window 256

In the loop: type text and the model continues it, streamed token by token; `/help` lists the commands
(`/reset` starts a new conversation, `/quit` or end of input (Ctrl-D) leaves), Ctrl-C stops an answer.
See docs/CHAT.md.
"""

from __future__ import annotations

import argparse
import sys

from src.chat.generate import Conversation, SamplingConfig, generate_text
from src.chat.store import HF_PREFIX, LoadedModel, ModelLoadError, load, parse_pe_overrides
from src.metrics import VAL_LOSS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = SamplingConfig()
    parser = argparse.ArgumentParser(prog="python -m src.chat", description="Chat with a trained pegrid model.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a local run dir / export folder, a Hub id ORG/REPO[/NAME], "
                                        "or with --repo the name of an export folder in that repo")
    source.add_argument("--hf", metavar="ID", help="a transformers GPT-2 from the Hub, e.g. gpt2")
    parser.add_argument("--repo", metavar="ORG/REPO", help="Hub repo holding export folders; --model names one")
    parser.add_argument("--prompt", help="one shot: print the continuation of this text and exit")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0 = off")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="1.0 = off")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--seed", type=int, default=None, help="fix sampling (default: random)")
    parser.add_argument("--window", type=int, default=None,
                        help="tokens seen by a PE that extrapolates (default 2 x block_size); see docs/CHAT.md")
    parser.add_argument("--pe", metavar="KEY=VALUE", action="append", default=[],
                        help="change the PE for inference, repeatable, e.g. --pe scaling.type=yarn --pe "
                             "scaling.factor=4 (RoPE context extension); see docs/CHAT.md")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.repo and not args.model:
        parser.error("--repo needs --model NAME (the export folder inside the repo)")
    if args.window is not None and args.window < 1:
        parser.error(f"--window must be positive, got {args.window}")
    return args


def model_spec(args: argparse.Namespace) -> str:
    if args.hf:
        return HF_PREFIX + args.hf
    return f"{args.repo.strip('/')}/{args.model}" if args.repo else args.model


def describe(loaded: LoadedModel) -> str:
    info = loaded.info
    line = (f"{loaded.spec}: pe={info['pe']} attention={info['attention']} params={info['num_params']:,} "
            f"tokenizer={loaded.tokenizer} context: {loaded.context}")
    if VAL_LOSS in loaded.metrics:
        line += f" {VAL_LOSS}={loaded.metrics[VAL_LOSS]:.3f}"
    return line + f" (loaded in {loaded.load_seconds:.1f} s)"


def answer(loaded: LoadedModel, conversation: Conversation, text: str, sampling: SamplingConfig) -> None:
    """Stream the model's continuation of `text` to stdout as it is generated."""
    for piece in generate_text(loaded.model, conversation, text, sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


HELP = """  /help    list these commands
  /reset   start a new conversation
  /quit    leave (or Ctrl-D)
  Ctrl-C   stop an answer
  //text   send text that starts with /"""


def chat_loop(loaded: LoadedModel, window: int | None, sampling: SamplingConfig) -> None:
    conversation = Conversation.for_model(loaded.model, window, tokenizer=loaded.tokenizer)
    print("Type text for the model to continue; /help lists the commands, /quit or Ctrl-D leaves.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        command = line.strip()
        if not command:
            continue
        if command.startswith("//"):
            line = line.lstrip()[1:]
        elif command.startswith("/"):  # a command, known or not, is never sent to the model
            name = command.split()[0]
            if name == "/quit":
                return
            if name == "/reset":
                conversation = Conversation.for_model(loaded.model, window, tokenizer=loaded.tokenizer)
                print("(new conversation)", file=sys.stderr)
            elif name == "/help":
                print(HELP, file=sys.stderr)
            else:
                print(f"unknown command {name}: /help lists the commands", file=sys.stderr)
            continue
        try:
            answer(loaded, conversation, line, sampling)
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  max_new_tokens=args.max_new_tokens, seed=args.seed)
        loaded = load(model_spec(args), args.device, parse_pe_overrides(args.pe))
    except (ModelLoadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe(loaded), file=sys.stderr)
    if args.prompt is not None:
        answer(loaded, Conversation.for_model(loaded.model, args.window, tokenizer=loaded.tokenizer), args.prompt,
               sampling)
        return 0
    try:
        chat_loop(loaded, args.window, sampling)
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0

