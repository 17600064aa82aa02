"""`mixtral-jax train`: train a preset from scratch or fine-tune a checkpoint on text files."""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train or fine-tune on text files (resumes when OUTPUT holds a run)",
        description="Next-token cross-entropy plus the router load-balancing loss, AdamW with warmup and "
                    "cosine decay, gradient clipping. Running again with the same --output and a larger --steps "
                    "resumes exactly.",
    )
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--config", help="preset name (e.g. tiny) or a model config .json/.toml file")
    start.add_argument("--init", metavar="CHECKPOINT", help="checkpoint folder to fine-tune")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    p.add_argument("--steps", type=int, required=True, help="total optimizer steps of the run")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--output", required=True, help="folder for checkpoints, metrics.jsonl and the config")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the checkpoint's, or Mixtral's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-3 from scratch, 2e-5 with --init)")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear warmup steps (default 10)")
    p.add_argument("--decay-steps", type=int, default=10_000, help="end of the cosine decay (default 10000)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay, not on norm scales (default 0.1)")
    p.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clip (default 1.0)")
    p.add_argument("--z-loss", type=float, metavar="COEF", help="router z-loss coefficient (default: the config's)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order (default 0)")
    p.add_argument("--mesh", help='device mesh, e.g. "fsdp=4,expert=2" (default: all devices on data)')
    p.add_argument("--remat", action="store_true", help="recompute layer activations in the backward pass")
    p.add_argument("--log-every", type=int, default=1, help="steps between metrics records (default 1)")
    p.add_argument("--save-every", type=int, default=100,
                   help="steps between checkpoints; the last step is always saved (default 100)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mixtral_jax.train import TrainConfig, train

    tc = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
        lr=args.lr if args.lr is not None else (2e-5 if args.init else 3e-3),
        warmup_steps=args.warmup_steps, decay_steps=args.decay_steps, weight_decay=args.weight_decay,
        clip_norm=args.clip_norm, seed=args.seed, remat=args.remat, log_every=args.log_every,
        save_every=args.save_every, keep=args.keep,
    )
    train(args.output, args.data, tc, config=_config(args.config) if args.config else None, init=args.init,
          tokenizer=args.tokenizer, mesh=args.mesh, z_loss=args.z_loss, progress=not args.no_progress)
    return 0


def _config(name: str):
    """A preset name, or a ModelConfig written as JSON or TOML."""
    from mixtral_jax.config import ModelConfig
    from mixtral_jax.errors import ConfigError

    path = Path(name)
    if path.suffix not in (".json", ".toml"):
        return name
    try:
        text = path.read_text()
        return ModelConfig.from_dict(json.loads(text) if path.suffix == ".json" else tomllib.loads(text))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: invalid {path.suffix[1:].upper()} ({e})") from None
