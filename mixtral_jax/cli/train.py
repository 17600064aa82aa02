"""`mixtral-jax train`: train a preset from scratch or fine-tune a checkpoint on text files."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from mixtral_jax.cli import _args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train or fine-tune on text files (resumes when OUTPUT holds a run)",
        description="Next-token cross-entropy plus the router load-balancing loss, AdamW with warmup and "
                    "cosine decay, gradient clipping. Running again with the same --output and a larger --steps "
                    "resumes exactly.",
    )
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--config", type=_args.path, help="preset name (e.g. tiny) or a model config .json/.toml file")
    start.add_argument("--init", metavar="CHECKPOINT", type=_args.path, help="checkpoint folder to fine-tune")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", type=_args.path, help="UTF-8 text files")
    p.add_argument("--steps", type=_args.positive_int, required=True, help="total optimizer steps of the run")
    p.add_argument("--batch-size", type=_args.positive_int, required=True,
                   help="sequences per step, split over the mesh's data and fsdp axes")
    p.add_argument("--seq-len", type=_args.positive_int, required=True,
                   help="tokens per sequence (at most the model's context)")
    p.add_argument("--output", required=True, type=_args.path,
                   help="folder for checkpoints, metrics.jsonl and the config")
    p.add_argument("--tokenizer", type=_args.path, help="SentencePiece model (default: the checkpoint's, or Mixtral's)")
    p.add_argument("--lr", type=_args.positive_float,
                   help="peak learning rate (default 3e-3 from scratch, 2e-5 with --init)")
    p.add_argument("--warmup-steps", type=_args.non_negative_int, default=10, help="linear warmup steps (default 10)")
    p.add_argument("--decay-steps", type=_args.positive_int, default=10_000,
                   help="end of the cosine decay (default 10000)")
    p.add_argument("--weight-decay", type=_args.non_negative_float, default=0.1,
                   help="AdamW decay, not on norm scales (default 0.1)")
    p.add_argument("--clip-norm", type=_args.positive_float, default=1.0,
                   help="global gradient-norm clip (default 1.0)")
    p.add_argument("--z-loss", type=_args.non_negative_float, metavar="COEF",
                   help="router z-loss coefficient (default: the config's)")
    p.add_argument("--seed", type=_args.seed, default=0,
                   help=f"initialisation and data order, 0 to {_args.SEED_LIMIT - 1} (default 0)")
    p.add_argument("--mesh", help='device mesh, e.g. "fsdp=4,expert=2" (default: all devices on data)')
    p.add_argument("--remat", action="store_true", help="recompute layer activations in the backward pass")
    p.add_argument("--log-every", type=_args.positive_int, default=1, help="steps between metrics records (default 1)")
    p.add_argument("--save-every", type=_args.positive_int, default=100,
                   help="steps between checkpoints; the last step is always saved (default 100)")
    p.add_argument("--keep", type=_args.positive_int, default=3,
                   help="checkpoints to keep, the latest ones; at least 1 (default 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run, oom_hint="lower --batch-size or --seq-len, or add --remat or devices")


def run(args: argparse.Namespace) -> int:
    from mixtral_jax.train import TrainConfig, train

    tc = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
        lr=args.lr if args.lr is not None else (2e-5 if args.init else 3e-3),
        warmup_steps=args.warmup_steps, decay_steps=args.decay_steps, weight_decay=args.weight_decay,
        clip_norm=args.clip_norm, seed=args.seed, remat=args.remat, log_every=args.log_every,
        save_every=args.save_every, keep=args.keep,
    )
    logged = train(args.output, args.data, tc, config=_config(args.config) if args.config else None,
                   init=args.init, tokenizer=args.tokenizer, mesh=args.mesh, z_loss=args.z_loss,
                   progress=not args.no_progress)
    if logged:
        print(f"trained to step {logged[-1]['step']} of {tc.steps}, loss {logged[-1]['loss']:.4f}; "
              f"the model is in {args.output}")
    else:
        print(f"{args.output} is already at step {tc.steps}: nothing to train")
    return 0


def _config(name: str):
    """A preset name, or a ModelConfig written as JSON or TOML."""
    from mixtral_jax.config import ModelConfig, read_json
    from mixtral_jax.errors import ConfigError

    path = Path(name)
    if path.suffix == ".json":
        return ModelConfig.from_dict(read_json(path), path)
    if path.suffix != ".toml":
        return name
    try:
        return ModelConfig.from_dict(tomllib.loads(path.read_text()), path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None
