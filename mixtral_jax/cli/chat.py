"""`mixtral-jax chat`: a conversation on stdin that keeps its history and streams each answer."""

from __future__ import annotations

import argparse
import sys

from mixtral_jax.cli import _common

HELP = "talk with an instruct model: one message per line on stdin; /reset forgets, /exit (or EOF) ends"
# Mistral's safe-mode system prompt (mistral-inference, `--safe_prompt`).
SAFE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid harmful, "
    "unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chat", help=HELP, description=HELP + ". The oldest turns are dropped when the "
                                                                    "conversation outgrows the context.")
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--safe", action="store_true", help="put Mistral's safe-mode prompt first in the system prompt")
    _common.add_sampling_args(p, max_new_tokens=256)
    _common.add_model_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mixtral_jax.errors import MixtralError
    from mixtral_jax.tokenizer import StreamDecoder

    settings = _common.sampling(args)
    model, tokenizer = _common.start(args)
    tokenizer = _common.require(tokenizer)
    system = [{"role": "system", "content": text} for text in ([SAFE_PROMPT] if args.safe else []) + [args.system]
              if text]
    room = model.config.max_seq_len - args.max_new_tokens
    if room < 1:
        raise MixtralError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a message in the "
                           f"context of {model.config.max_seq_len} tokens")
    history: list[dict[str, str]] = []
    prompt = ">>> " if sys.stdin.isatty() else ""
    turn = 0
    while True:
        try:
            line = input(prompt).strip()
        except EOFError:
            return 0
        if line == "/exit":
            return 0
        if line == "/reset":
            history.clear()
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        ids = _fit(tokenizer, system, history, room)
        decoder, new = StreamDecoder(tokenizer), []
        try:
            for token in model.stream(ids, args.max_new_tokens, **{**settings, "seed": settings["seed"] + turn}):
                new.append(token)
                print(decoder.push(token), end="", flush=True)
        except MixtralError as e:  # this message does not fit: say so and keep the conversation
            print(f"mixtral-jax chat: error: {e}", file=sys.stderr)
            history.pop()
            continue
        print(decoder.flush(), flush=True)
        answer = tokenizer.decode(new).strip()
        if answer:  # an empty answer cannot be encoded as an assistant turn
            history.append({"role": "assistant", "content": answer})
        turn += 1


def _fit(tokenizer, system: list[dict], history: list[dict], room: int) -> list[int]:
    """The chat's ids, dropping the oldest messages of `history` (in place) until they fit in `room`."""
    while True:
        ids = tokenizer.encode_chat(system + history)
        if len(ids) <= room or len(history) == 1:
            return ids
        del history[0]
        while history[0]["role"] != "user":
            del history[0]
