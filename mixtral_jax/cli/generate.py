"""`mixtral-jax generate`: continue prompts, streaming the text or printing one JSON line per prompt."""

from __future__ import annotations

import argparse
import json

from mixtral_jax.cli import _common

HELP = "continue one prompt or a batch of prompts"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help=HELP,
        description=HELP + ". Prints the new text (streamed for one prompt) or, with --json, one line per prompt "
                           "with the new token ids and their text.",
    )
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", metavar="TEXT", help="text to continue; repeat it for a batch")
    prompts.add_argument("--ids", action="append", metavar="ID,ID,...",
                         help="a prompt as token ids (BOS included if wanted); repeat it for a batch")
    p.add_argument("--chat", action="store_true",
                   help="send each prompt as a user message in the model's instruct format")
    _common.add_sampling_args(p, max_new_tokens=64)
    p.add_argument("--json", action="store_true",
                   help='one JSON line per prompt: {"prompt_ids", "ids" (new), "text" (new)}')
    _common.add_model_args(p)
    p.set_defaults(run=run, oom_hint="give fewer prompts or a lower --max-new-tokens, or a --mesh over more devices")


def run(args: argparse.Namespace) -> int:
    from mixtral_jax.errors import MixtralError
    from mixtral_jax.tokenizer import StreamDecoder

    settings = _common.sampling(args)
    if args.chat and args.ids:
        raise MixtralError("--chat needs --prompt text, not --ids")
    prompts = [_common.parse_ids(text) for text in args.ids or ()]
    model, tokenizer = _common.start(args)
    if not prompts:
        tokenizer = _common.require(tokenizer)
        encode = (lambda t: tokenizer.encode_chat([{"role": "user", "content": t}])) if args.chat else tokenizer.encode
        prompts = [encode(text) for text in args.prompt]

    if len(prompts) == 1 and not args.json:
        decoder = StreamDecoder(tokenizer) if tokenizer else None
        for token in model.stream(prompts[0], args.max_new_tokens, **settings):
            print(decoder.push(token) if decoder else f"{token} ", end="", flush=True)
        print(decoder.flush() if decoder else "", flush=True)
        return 0

    for prompt, new in zip(prompts, model.generate(prompts, args.max_new_tokens, **settings)):
        text = tokenizer.decode(new) if tokenizer else None
        if args.json:
            print(json.dumps({"prompt_ids": prompt, "ids": new, "text": text}), flush=True)
        else:
            print(text if tokenizer else " ".join(map(str, new)), end="\n\n", flush=True)
    return 0
