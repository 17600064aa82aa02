"""`mixtral-jax eval`: passkey retrieval, perplexity against context length, and lm-evaluation-harness tasks."""

from __future__ import annotations

import argparse
from pathlib import Path

from mixtral_jax.cli import _args, _common

HELP = "evaluate a model: passkey retrieval, perplexity against context length, lm-evaluation-harness"
OUTPUT = "eval-results"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help=HELP, description=HELP + " (docs/eval.md).")
    evals = p.add_subparsers(dest="evaluation", metavar="EVALUATION", required=True, parser_class=type(p))

    key = evals.add_parser("passkey", help="find a 5-digit key hidden at several depths of long prompts",
                           description="Passkey retrieval: writes OUTPUT/passkey.json (every trial) and "
                                       "OUTPUT/passkey.png (accuracy, length x depth).")
    key.add_argument("--lengths", type=_lengths, metavar="N,N,...",
                     help="prompt lengths in tokens (default: powers of two from 1024 to the model's context)")
    key.add_argument("--depths", type=_args.positive_int, default=5, metavar="K",
                     help="depths of the key, spread evenly from the start to the end of the filler (default 5)")
    key.add_argument("--trials", type=_args.positive_int, default=5, metavar="N",
                     help="keys tried at each length and depth (default 5)")
    key.add_argument("--seed", type=_args.seed, default=0, metavar="S", help="seed of the keys (default 0)")
    _shared(key, oom_hint="lower --batch-size, or use a --mesh over more devices")
    key.set_defaults(run=run_passkey)

    ppl = evals.add_parser("perplexity", help="perplexity of the same tokens given more and more context",
                           description="Perplexity against context length: writes OUTPUT/perplexity.json and "
                                       "OUTPUT/perplexity.png.")
    ppl.add_argument("--file", nargs="+", required=True, metavar="F", help="UTF-8 text files, one document each")
    ppl.add_argument("--contexts", type=_lengths, metavar="N,N,...",
                     help="context lengths in tokens (default: powers of two from 512 to the model's context)")
    ppl.add_argument("--eval-tokens", type=_args.positive_int, default=256, metavar="N",
                     help="the last N tokens of every window are the ones scored (default 256)")
    _shared(ppl, oom_hint="lower --batch-size, or use a --mesh over more devices")
    ppl.set_defaults(run=run_perplexity)

    lm = evals.add_parser("lm-eval", help="run lm-evaluation-harness tasks",
                          description="Runs lm-evaluation-harness's simple_evaluate on the model and prints its "
                                      "table; writes OUTPUT/lm-eval.json.")
    lm.add_argument("--tasks", required=True, metavar="T,T,...", help="lm-eval task names, comma-separated")
    lm.add_argument("--include-path", metavar="DIR", type=_args.path, help="a folder of extra task YAML files")
    lm.add_argument("--limit", type=_args.positive_int, metavar="N", help="at most N examples a task")
    lm.add_argument("--num-fewshot", type=_args.non_negative_int, metavar="N", help="few-shot examples a prompt")
    _shared(lm, oom_hint="lower --batch-size, or use a --mesh over more devices")
    lm.set_defaults(run=run_lm_eval)


def _shared(p: argparse.ArgumentParser, oom_hint: str) -> None:
    p.add_argument("--batch-size", type=_args.positive_int, default=8, metavar="N",
                   help="prompts run together (default 8)")
    p.add_argument("--output", default=OUTPUT, metavar="DIR", type=_args.path,
                   help=f"where the results go (default ./{OUTPUT}); a rerun resumes from what is there")
    p.add_argument("--force", action="store_true", help="recompute what OUTPUT already holds")
    _common.add_model_args(p)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks and the libraries' own logs")
    p.set_defaults(oom_hint=oom_hint)


def _lengths(text: str) -> list[int]:
    try:
        values = sorted({int(part) for part in text.replace(",", " ").split()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token counts separated by commas, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive token counts, got {text!r}")
    return values


def _powers_of_two(low: int, high: int) -> list[int]:
    return [1 << k for k in range(low.bit_length() - 1, high.bit_length()) if low <= 1 << k <= high]


def run_passkey(args: argparse.Namespace) -> int:
    from mixtral_jax.evals import passkey, store

    store.need("matplotlib")
    model, tokenizer = _common.start(args)
    tokenizer = _common.require(tokenizer)
    lengths = args.lengths or _powers_of_two(min(1024, model.config.max_seq_len), model.config.max_seq_len)
    results = passkey.evaluate(model, tokenizer, lengths, args.depths, args.trials, args.seed, args.batch_size,
                               args.output, args.force, title=_name(args))
    for (length, depth), value in passkey.accuracy(results["trials"]).items():
        print(f"length {length:>6}  depth {100 * depth:>3.0f}%  accuracy {100 * value:5.1f}%")
    _common.note(f"wrote {Path(args.output) / 'passkey.json'} and passkey.png")
    return 0


def run_perplexity(args: argparse.Namespace) -> int:
    from mixtral_jax.cli.score import _read
    from mixtral_jax.evals import perplexity, store

    store.need("matplotlib")
    texts = [_read(name) for name in args.file]
    model, tokenizer = _common.start(args)
    tokenizer = _common.require(tokenizer)
    contexts = args.contexts or _powers_of_two(min(512, model.config.max_seq_len), model.config.max_seq_len)
    results = perplexity.evaluate(model, [tokenizer.encode(text) for text in texts], contexts, args.eval_tokens,
                                  args.batch_size, args.output, args.force, sources=args.file, title=_name(args))
    for r in results["contexts"]:
        print(f"context {r['context']:>6}  nll {r['nll']:.4f}  perplexity {r['perplexity']:.3f}")
    _common.note(f"wrote {Path(args.output) / 'perplexity.json'} and perplexity.png")
    return 0


def run_lm_eval(args: argparse.Namespace) -> int:
    from mixtral_jax.evals import lm_eval_run, store

    store.need("lm-eval")
    tasks = [t for t in args.tasks.split(",") if t]
    manager = lm_eval_run.task_manager(tasks, args.include_path)
    model, tokenizer = _common.start(args)
    results, table = lm_eval_run.evaluate(model, _common.require(tokenizer), tasks, manager, args.limit,
                                          args.num_fewshot, args.batch_size, args.output, args.force)
    print(table)
    _common.note(f"wrote {Path(args.output) / 'lm-eval.json'}")
    return 0


def _name(args: argparse.Namespace) -> str:
    return f"{Path(args.checkpoint).name if args.checkpoint else 'demo model'}"

