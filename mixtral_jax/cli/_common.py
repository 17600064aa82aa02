"""What `generate`, `chat` and `score` share: the model and sampling flags, and which model runs."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from mixtral_jax import distributed
from mixtral_jax.config import DTYPES
from mixtral_jax.errors import MixtralError

if TYPE_CHECKING:
    from mixtral_jax.api import Mixtral
    from mixtral_jax.tokenizer import Tokenizer


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="DIR",
                   help="a `mixtral-jax convert` or `train` output, or a Hugging Face or Mistral checkpoint "
                        "folder (default: the built-in model, named on stderr)")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="SentencePiece model (default: the checkpoint's; else Mixtral's for a 32000-token vocab)")
    p.add_argument("--dtype", choices=DTYPES, help="weights and compute dtype (default: as stored)")
    p.add_argument("--mesh", help='device mesh, e.g. "expert=4,tensor=2" (default: one device)')
    distributed.add_distributed_args(p)


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help=f"new tokens per answer at most (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.7, metavar="T", help="0 is greedy (default 0.7)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, metavar="P",
                   help="sample within the smallest set of most likely tokens of probability P")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed of the sampler (default 0)")


def sampling(args: argparse.Namespace) -> dict:
    """The sampling flags as `Mixtral.generate` keywords, checked before anything is loaded."""
    from mixtral_jax.sampling import check_settings

    check_settings(args.temperature, args.top_k, args.top_p)
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def load_model(args: argparse.Namespace) -> Mixtral:
    """The model a command runs: `--checkpoint`, or else the built-in default."""
    import mixtral_jax
    from mixtral_jax import demo

    if args.checkpoint:
        return mixtral_jax.load(args.checkpoint, dtype=args.dtype, mesh=args.mesh)
    model = demo.load(dtype=args.dtype, mesh=args.mesh)
    note(f"no --checkpoint given: running {demo.NAME}")
    return model


def start(args: argparse.Namespace) -> tuple[Mixtral, Tokenizer | None]:
    """Join the multi-host job (before any other JAX use), then the model and its tokenizer."""
    distributed.from_args(args)
    model = load_model(args)
    return model, tokenizer_for(model, args.tokenizer)


def tokenizer_for(model: Mixtral, path: str | None) -> Tokenizer | None:
    """`path`, else the model's tokenizer, else Mixtral's when the vocabulary has its size, else None."""
    from mixtral_jax.tokenizer import Tokenizer

    if path:
        return Tokenizer(path)
    if model.tokenizer is not None:
        return model.tokenizer
    default = Tokenizer.from_default()
    if default.vocab_size != model.config.vocab_size:
        return None
    note("the checkpoint has no tokenizer.model: using Mixtral's")
    return default


def require(tokenizer: Tokenizer | None) -> Tokenizer:
    if tokenizer is None:
        raise MixtralError("the checkpoint has no tokenizer.model: pass --tokenizer FILE (or token ids with --ids)")
    return tokenizer


def parse_ids(text: str) -> list[int]:
    """`"1,17,42"` (or space-separated) -> [1, 17, 42]."""
    try:
        ids = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise MixtralError(f"--ids {text!r}: expected integers separated by commas") from None
    if not ids:
        raise MixtralError("--ids: no token ids given")
    return ids


def note(message: str) -> None:
    print(f"mixtral-jax: note: {message}", file=sys.stderr)
