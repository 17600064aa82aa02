"""What `generate`, `chat` and `score` share: the model and sampling flags, and which model runs."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from mixtral_jax import distributed
from mixtral_jax.cli import _args
from mixtral_jax.config import DTYPES, KV_CACHE_DTYPES, QUANTIZE
from mixtral_jax.errors import MixtralError

if TYPE_CHECKING:
    from mixtral_jax.api import Mixtral
    from mixtral_jax.tokenizer import Tokenizer

COMPILE_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "mixtral-jax", "xla")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="DIR", type=_args.path,
                   help="a `mixtral-jax convert` or `train` output, or a Hugging Face or Mistral checkpoint "
                        "folder (default: the built-in model, named on stderr)")
    p.add_argument("--tokenizer", metavar="FILE", type=_args.path,
                   help="SentencePiece model (default: the checkpoint's; else Mixtral's for a 32000-token vocab)")
    p.add_argument("--dtype", choices=DTYPES, help="weights and compute dtype (default: as stored)")
    p.add_argument("--mesh", help='device mesh, e.g. "expert=4,tensor=2" (default: one device)')
    p.add_argument("--backend", choices=("reference", "cpu", "gpu", "tpu"),
                   help="how the model runs (default: the platform's; docs/backends.md)")
    p.add_argument("--quantize", choices=QUANTIZE[1:],
                   help="quantise a 16-bit checkpoint's attention and expert weights while loading "
                        "(docs/quantization.md; default: as stored)")
    p.add_argument("--quant-group", type=_args.positive_int, metavar="N",
                   help="int4: entries per scale along the contracted dimension (default 128)")
    p.add_argument("--quantize-vocab", action="store_true",
                   help="with --quantize: the embedding table and LM head too (default: they keep their dtype)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                   help="int8: keys and values in int8 with a scale per token and KV head (default auto: the "
                        "compute dtype)")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="load a Hugging Face or Mistral folder whose weights hold NaN or inf (refused by default)")
    p.add_argument("--compile-cache", metavar="DIR",
                   help="keep compiled programs here, so that the next start with the same model, mesh and shapes "
                        "loads them rather than compiling; 'off' for none (default: $JAX_COMPILATION_CACHE_DIR, "
                        f"else {COMPILE_CACHE})")
    distributed.add_distributed_args(p)


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=_args.positive_int, default=max_new_tokens, metavar="N",
                   help=f"new tokens per answer at most (default {max_new_tokens})")
    p.add_argument("--temperature", type=_args.non_negative_float, default=0.7, metavar="T",
                   help="0 is greedy (default 0.7)")
    p.add_argument("--top-k", type=_args.positive_int, metavar="K", help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=_args.probability, metavar="P",
                   help="sample within the smallest set of most likely tokens of probability P, in (0, 1]")
    p.add_argument("--seed", type=_args.seed, default=0, metavar="S",
                   help=f"random seed of the sampler, 0 to {_args.SEED_LIMIT - 1} (default 0)")


def sampling(args: argparse.Namespace) -> dict:
    """The sampling flags (checked by the parser) as `Mixtral.generate` keywords."""
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def load_model(args: argparse.Namespace) -> Mixtral:
    """The model a command runs: `--checkpoint`, or else the built-in default."""
    import mixtral_jax
    from mixtral_jax import demo

    options = dict(quantize=args.quantize, quant_group=args.quant_group, quantize_vocab=args.quantize_vocab,
                   kv_cache_dtype=args.kv_cache_dtype)
    if args.checkpoint is not None:
        return mixtral_jax.load(args.checkpoint, dtype=args.dtype, mesh=args.mesh, backend=args.backend,
                                allow_non_finite=args.allow_non_finite, **options)
    model = demo.load(dtype=args.dtype, mesh=args.mesh, backend=args.backend, **options)
    note(f"no --checkpoint given: running {demo.NAME}")
    return model


def use_compile_cache(folder: str | None) -> None:
    """JAX's persistent compilation cache in `folder` ('off': none; None: $JAX_COMPILATION_CACHE_DIR, which JAX
    reads itself, else `COMPILE_CACHE`), set before the first program compiles."""
    if folder == "off" or (folder is None and os.environ.get("JAX_COMPILATION_CACHE_DIR")):
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(folder or COMPILE_CACHE))


def start(args: argparse.Namespace) -> tuple[Mixtral, Tokenizer | None]:
    """Join the multi-host job (before any other JAX use), then the model, running with its tokenizer (which
    decides the end-of-sequence id and which ids may be sampled)."""
    distributed.from_args(args)
    use_compile_cache(args.compile_cache)
    model = load_model(args)
    tokenizer = tokenizer_for(model, args.tokenizer)
    if tokenizer is not None and tokenizer is not model.tokenizer:
        model = model.with_tokenizer(tokenizer)
    return model, tokenizer


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
