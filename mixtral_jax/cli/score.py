"""`mixtral-jax score`: the log-probability the model gives each next token of a text."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from mixtral_jax.cli import _common

HELP = "log-probabilities, mean negative log-likelihood and perplexity of a text"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("score", help=HELP, description=HELP + " (BOS first; nll in nats per predicted token).")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the text to score")
    text.add_argument("--file", help="a UTF-8 text file to score")
    text.add_argument("--ids", metavar="ID,ID,...", help="token ids to score as they are (BOS included if wanted)")
    p.add_argument("--json", action="store_true",
                   help='one JSON line: {"ids" (with BOS), "logprobs" (of each next token), "nll", "perplexity"}')
    _common.add_model_args(p)
    p.set_defaults(run=run, oom_hint="score a shorter text, or use a --mesh over more devices")


def run(args: argparse.Namespace) -> int:
    from mixtral_jax.errors import MixtralError

    ids = _common.parse_ids(args.ids) if args.ids else None
    text = _read(args.file) if args.file else args.text
    model, tokenizer = _common.start(args)
    ids = ids or _common.require(tokenizer).encode(text)
    if len(ids) < 2:
        raise MixtralError("nothing to score: the text has no token after BOS")
    print(report(ids, model.score(ids).tolist(), args.json))
    return 0


def report(ids: list[int], logprobs: list[float], as_json: bool) -> str:
    """The output line, text or one JSON object. JSON has no NaN or Infinity: a value that is not finite
    (a model whose weights hold NaN or inf, a probability of 0) is null there."""
    nll = -sum(logprobs) / len(logprobs)
    perplexity = _exp(nll)
    if not as_json:
        return f"{len(ids)} tokens: nll {nll:.4f} nats/token, perplexity {perplexity:.2f}"
    fields = {"ids": ids, "logprobs": [_finite(x) for x in logprobs], "nll": _finite(nll),
              "perplexity": _finite(perplexity)}
    return json.dumps(fields, allow_nan=False)


def _exp(x: float) -> float:
    """e ** x, inf where that overflows a float."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _read(path: str) -> str:
    from mixtral_jax.errors import MixtralError

    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise MixtralError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise MixtralError(f"{path}: not UTF-8 text") from None
