"""`mixtral-jax chat`: a conversation on stdin that keeps its history and streams each answer."""

from __future__ import annotations

import argparse
import sys

from mixtral_jax.cli import _common
from mixtral_jax.errors import MixtralError
from mixtral_jax.tokenizer import SAFE_PROMPT

HELP = "talk with an instruct model: one message per line on stdin; /reset forgets, /exit (or EOF) ends"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chat", help=HELP, description=HELP + ". The oldest turns are dropped when the "
                                                                    "conversation outgrows the context.")
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--safe", action="store_true", help="put Mistral's safe-mode prompt first in the system prompt")
    _common.add_sampling_args(p, max_new_tokens=256)
    _common.add_model_args(p)
    p.set_defaults(run=run, oom_hint="lower --max-new-tokens, or use a --mesh over more devices")


def run(args: argparse.Namespace) -> int:
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
    tokenizer.encode_chat(system + [{"role": "user", "content": ""}])  # an unusable system prompt ends the chat here
    if hasattr(sys.stdin, "reconfigure"):  # invalid UTF-8 reaches the tokenizer, which refuses that message alone
        sys.stdin.reconfigure(errors="surrogateescape")
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
        message = {"role": "user", "content": line}
        decoder, new = StreamDecoder(tokenizer), []
        try:  # a message that cannot be answered is refused alone: the conversation stays as it was
            ids, kept = _fit(tokenizer, system, history, message, room)
            for token in model.stream(ids, args.max_new_tokens, **{**settings, "seed": settings["seed"] + turn}):
                new.append(token)
                print(decoder.push(token), end="", flush=True)
        except MixtralError as e:
            print(f"mixtral-jax chat: error: {e}", file=sys.stderr)
            continue
        print(decoder.flush(), flush=True)
        answer = tokenizer.decode(new).strip()
        # an empty answer cannot be encoded as an assistant turn
        history[:] = kept + [message] + ([{"role": "assistant", "content": answer}] if answer else [])
        turn += 1


def _fit(tokenizer, system: list[dict], history: list[dict], message: dict, room: int) -> tuple[list[int], list[dict]]:
    """The ids of the chat with `message` last, and the part of `history` they keep: the oldest turns are
    dropped until it fits in `room` tokens. `history` is not changed; a message that does not fit even
    without any history is refused (MixtralError)."""
    kept = list(history)
    while True:
        ids = tokenizer.encode_chat(system + kept + [message])
        if len(ids) <= room:
            return ids, kept
        if not kept:
            raise MixtralError(f"this message takes {len(ids)} tokens with the system prompt, more than the "
                               f"{room} that the context leaves beside --max-new-tokens; it was not sent")
        del kept[0]
        while kept and kept[0]["role"] != "user":
            del kept[0]
