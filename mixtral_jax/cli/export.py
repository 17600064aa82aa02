"""`mixtral-jax export`: write a checkpoint as a Hugging Face folder that transformers loads."""

from __future__ import annotations

import argparse

from mixtral_jax.cli import _args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write a checkpoint (e.g. a training OUTPUT) as Hugging Face safetensors + config.json",
        description="Writes config.json, model.safetensors and the tokenizer for transformers' "
                    "MixtralForCausalLM (MistralForCausalLM when dense). The folder appears only when complete.",
    )
    p.add_argument("checkpoint", type=_args.path,
                   help="training OUTPUT, model folder, or Hugging Face / Mistral checkpoint folder")
    p.add_argument("hf_folder", type=_args.path, help="folder to write")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="stored dtype (default: as loaded)")
    p.add_argument("--force", action="store_true",
                   help="replace HF_FOLDER if it exists and is a folder mixtral-jax wrote, holding nothing else, "
                        "that neither is nor holds CHECKPOINT")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mixtral_jax import api, loading, outputs
    from mixtral_jax.convert.export_hf import check_exportable, export
    from mixtral_jax.errors import CheckpointError
    from mixtral_jax.train import tokenizer_file

    source = Path(args.checkpoint)
    if not source.is_dir():
        raise CheckpointError(f"{source}: no such checkpoint folder")
    if Path(args.hf_folder).exists() and not args.force:
        raise CheckpointError(f"{args.hf_folder}: already exists (pass --force to replace it)")
    outputs.check_replaceable(args.hf_folder, [source])  # before the weights are loaded
    check_exportable(loading.open_checkpoint(source).config)  # before the weights are loaded
    model = api.load(source, backend="reference")  # the checkpoint layout, which export walks
    export(model.config, model.checkpoint_params(), args.hf_folder, args.dtype, tokenizer_file(source),
           force=args.force, sources=[source])
    print(f"wrote {args.hf_folder}")
    return 0
