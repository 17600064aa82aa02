"""`mixtral-jax serve`: an OpenAI-compatible HTTP server with continuous batching (docs/serve.md)."""

from __future__ import annotations

import argparse
import time

from mixtral_jax.cli import _args, _common
from mixtral_jax.errors import MixtralError

HELP = "serve the model over OpenAI's HTTP API (completions, chat completions; streamed or whole)"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help=HELP, description=HELP + ". Needs the `serve` extra.")
    _common.add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_args.positive_int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--max-slots", type=_args.positive_int, default=8, metavar="N",
                   help="requests decoded together (default 8); `mixtral-jax plan --batch N` sizes it")
    p.add_argument("--max-len", type=_args.positive_int, metavar="L",
                   help="prompt plus completion tokens per request at most (default: the model's context)")
    p.add_argument("--steps", type=_args.positive_int, default=4, metavar="K",
                   help="decode steps per host round trip (default 4)")
    p.add_argument("--api-key", metavar="KEY", help="require `Authorization: Bearer KEY` on /v1/ routes")
    p.add_argument("--model-name", default="mixtral-jax", help="the model id /v1/models lists (default mixtral-jax)")
    p.set_defaults(run=run, oom_hint="lower --max-slots or --max-len, or give a --mesh over more devices")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from mixtral_jax.serve.app import Metrics, create_app
        from mixtral_jax.serve.scheduler import Scheduler
    except ImportError as e:
        raise MixtralError(f"serve needs the `serve` extra ({e.name} is missing): pip install -e \".[serve]\"") from e
    from mixtral_jax.engine import Engine

    model, tokenizer = _common.start(args)
    import jax

    if jax.process_count() > 1:
        raise MixtralError("serve runs on one host's devices; serving across hosts is not yet supported")
    if tokenizer is None:
        raise MixtralError("serve needs a tokenizer: give --tokenizer")
    if args.max_len is not None and args.max_len > model.config.max_seq_len:
        raise MixtralError(f"--max-len {args.max_len} exceeds the model's context of {model.config.max_seq_len}")
    began = time.perf_counter()
    engine = Engine(model, slots=args.max_slots, max_len=args.max_len, steps=args.steps)
    buckets = engine.compile_all()
    _common.note(f"compiled prefill for {buckets} prompt lengths and the decode round in "
                 f"{time.perf_counter() - began:.1f} s; serving on http://{args.host}:{args.port}/v1")
    metrics = Metrics()
    scheduler = Scheduler(engine, tokenizer, metrics.observe)
    scheduler.start()
    app = create_app(scheduler, metrics, args.model_name, engine.max_len, args.api_key)
    uvicorn.run(app, host=args.host, port=args.port, log_level="debug" if args.debug else "warning")
    scheduler.stop()
    scheduler.join(timeout=60)  # its round ends before the interpreter tears down under it
    return 0
