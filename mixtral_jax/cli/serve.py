"""`mixtral-jax serve`: an OpenAI-compatible HTTP server with continuous batching (docs/serve.md)."""

from __future__ import annotations

import argparse
import signal
import time

from mixtral_jax.cli import _args, _common
from mixtral_jax.errors import MixtralError
from mixtral_jax.serve import MAX_BODY_BYTES, MAX_QUEUE, SHUTDOWN_GRACE_S

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
    p.add_argument("--prefill-chunk", type=_args.positive_int, metavar="C",
                   help="prompt tokens prefilled between two decode rounds at most (default 2048): smaller keeps "
                        "running streams smoother while long prompts arrive, larger admits them sooner")
    p.add_argument("--max-logprobs", type=_args.non_negative_int, default=20, metavar="K",
                   help="alternatives per token a request may ask for with logprobs (default 20; 0: none)")
    p.add_argument("--api-key", metavar="KEY", help="require `Authorization: Bearer KEY` on /v1/ routes")
    p.add_argument("--model-name", default="mixtral-jax", help="the model id /v1/models lists (default mixtral-jax)")
    p.add_argument("--max-queue", type=_args.non_negative_int, default=MAX_QUEUE, metavar="N",
                   help=f"requests waiting for a free slot at most (default {MAX_QUEUE}); more are a 429")
    p.add_argument("--max-body-bytes", type=_args.positive_int, default=MAX_BODY_BYTES, metavar="B",
                   help=f"request body size at most (default {MAX_BODY_BYTES}: 4 MiB); larger is a 413")
    p.add_argument("--shutdown-grace", type=_args.non_negative_float, default=SHUTDOWN_GRACE_S, metavar="S",
                   help=f"seconds the requests in flight get to finish after SIGTERM or Ctrl-C (default "
                        f"{SHUTDOWN_GRACE_S:g})")
    p.set_defaults(run=run, oom_hint="lower --max-slots or --max-len, or give a --mesh over more devices")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from mixtral_jax.serve.app import Metrics, create_app
        from mixtral_jax.serve.scheduler import Scheduler, broadcast, follow
    except ImportError as e:
        raise MixtralError(f"serve needs the `serve` extra ({e.name} is missing): pip install -e \".[serve]\"") from e
    from mixtral_jax.engine import Engine

    model, tokenizer = _common.start(args)
    import jax

    if tokenizer is None:
        raise MixtralError("serve needs a tokenizer: give --tokenizer")
    if args.max_len is not None and args.max_len > model.config.max_seq_len:
        raise MixtralError(f"--max-len {args.max_len} exceeds the model's context of {model.config.max_seq_len}")
    began = time.perf_counter()
    engine = Engine(model, slots=args.max_slots, max_len=args.max_len, steps=args.steps, chunk=args.prefill_chunk,
                    logprobs=args.max_logprobs)
    prefills = engine.compile_all()
    where = (f"serving on http://{args.host}:{args.port}/v1" if jax.process_index() == 0 else
             "following process 0's rounds")
    _common.note(f"compiled and warmed {prefills} prefill programs and the decode round in "
                 f"{time.perf_counter() - began:.1f} s; {where}")
    if jax.process_index() > 0:  # process 0 listens, and hands every process each round's plan
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # process 0 says when to stop
        try:
            follow(engine)
        finally:
            signal.signal(signal.SIGTERM, previous)
        return 0
    metrics = Metrics()
    scheduler = Scheduler(engine, tokenizer, metrics.observe, sync=broadcast if jax.process_count() > 1 else None)
    scheduler.start()
    app = create_app(scheduler, metrics, args.model_name, engine.max_len, api_key=args.api_key,
                     max_queue=args.max_queue, max_body_bytes=args.max_body_bytes)
    # uvicorn closes the port at SIGTERM, lets the requests in flight finish, then raises the signal again
    # under the handler it found: one that does nothing lets the slots stop and the command exit 0
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="debug" if args.debug else "warning",
                    timeout_graceful_shutdown=args.shutdown_grace)
    finally:
        signal.signal(signal.SIGTERM, previous)
    scheduler.stop()
    scheduler.join(timeout=60)  # its round ends before the interpreter tears down under it
    return 0
