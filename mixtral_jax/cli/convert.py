"""`mixtral-jax convert SOURCE OUTPUT`: a Hugging Face or Mistral checkpoint folder -> a model folder (Orbax)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a Hugging Face or Mistral checkpoint folder into an Orbax model folder",
        description="Convert a Hugging Face folder (config.json + safetensors) or a Mistral release "
                    "(params.json + consolidated .safetensors/.pth/.pt) into a model folder that "
                    "mixtral_jax.load restores straight into sharded arrays.",
    )
    p.add_argument("source", help="checkpoint folder to read")
    p.add_argument("output", help="model folder to create (written beside it, renamed into place when complete)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="storage dtype (default: the source's)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mixtral_jax.convert.writer import convert

    print(convert(args.source, args.output, dtype=args.dtype, force=args.force))
    return 0
