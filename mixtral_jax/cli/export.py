"""`mixtral-jax export`: write a checkpoint as a Hugging Face folder that transformers loads."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write a checkpoint (e.g. a training OUTPUT) as Hugging Face safetensors + config.json",
        description="Writes config.json, model.safetensors and the tokenizer for transformers' "
                    "MixtralForCausalLM (MistralForCausalLM when dense).",
    )
    p.add_argument("checkpoint", help="training OUTPUT folder or any checkpoint folder mixtral-jax loads")
    p.add_argument("hf_folder", help="folder to write")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="stored dtype (default: as loaded)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mixtral_jax import api, trained
    from mixtral_jax.convert.export_hf import export
    from mixtral_jax.train import tokenizer_file

    source = Path(args.checkpoint)
    model = trained.load_trained(source) if trained.is_training_output(source) else api.load(source)
    export(model.config, model.params, args.hf_folder, args.dtype, tokenizer_file(source))
    print(f"wrote {args.hf_folder}")
    return 0
