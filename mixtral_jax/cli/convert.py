"""`mixtral-jax convert SOURCE OUTPUT`: a Hugging Face or Mistral checkpoint folder -> a model folder (Orbax)."""

from __future__ import annotations

import argparse
import sys

from mixtral_jax.cli import _args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a Hugging Face or Mistral checkpoint folder into an Orbax model folder",
        description="Convert a Hugging Face folder (config.json + safetensors) or a Mistral release "
                    "(params.json + consolidated .safetensors/.pth/.pt) into a model folder that "
                    "mixtral_jax.load restores straight into sharded arrays.",
    )
    p.add_argument("source", type=_args.path, help="checkpoint folder to read")
    p.add_argument("output", type=_args.path,
                   help="model folder to create (written beside it, renamed into place when complete)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="storage dtype (default: the source's)")
    p.add_argument("--quantize", choices=("int8", "int4"),
                   help="store the attention and expert weights quantised (docs/quantization.md)")
    p.add_argument("--quant-group", type=_args.positive_int, metavar="N",
                   help="int4: entries per scale along the contracted dimension (default 128)")
    p.add_argument("--quantize-vocab", action="store_true",
                   help="with --quantize: store the embedding table and LM head quantised too")
    p.add_argument("--force", action="store_true",
                   help="replace OUTPUT if it exists and is a folder mixtral-jax wrote, holding nothing else, "
                        "that neither is nor holds the source")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="convert weights that hold NaN or inf values (refused by default)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mixtral_jax.convert.writer import convert

    # A progress bar only on a terminal: in a log or a pipe it would be lines of carriage returns.
    print(convert(args.source, args.output, dtype=args.dtype, force=args.force, progress=sys.stderr.isatty(),
                  allow_non_finite=args.allow_non_finite, quantize=args.quantize, quant_group=args.quant_group,
                  quantize_vocab=args.quantize_vocab))
    return 0
