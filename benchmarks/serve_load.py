"""Serving under load: our OpenAI-compatible server and transformers' on one checkpoint, against offline `generate`.

Run: python -m benchmarks.serve_load [--servers offline,ours,transformers] [--concurrency 1,8,32]
     [--requests R] [--checkpoint DIR] [--max-slots N] [--dtype float32] [--device cpu] [--quick]
     [--ours-flags "--steps 2"]

The workload is fixed by a seed: R requests (default 128) whose prompts are 16 to 400 tokens of words from
the tokenizer's vocabulary (each word one token, so both servers' tokenizers give the same ids, which is
checked) and whose `max_tokens` are 16 to 128. For each concurrency level N that many clients, in one
process with the official `openai` package's `AsyncOpenAI`, each send the next request as their last one
ends (greedy, streamed completions with `stream_options={"include_usage": True}`) until all are done.
Output tokens are the servers' usage counts, over the wall time of the whole run. Time to first token
(TTFT) is from sending a request to its first text; inter-token latency (ITL) is the gap between successive
streamed texts of one request, so tokens a server sends together show as one long gap then near-zero ones;
time per output token (TPOT) is a request's time from first to last text over its tokens after the first.

The servers run one at a time, on 127.0.0.1, each started here and stopped when its runs end:
- ours: `mixtral-jax serve --checkpoint DIR --dtype D --max-slots N --max-len L`, restarted for each level
  with as many slots as clients unless `--max-slots` fixes them (L: the workload's longest request);
- transformers: `transformers serve DIR --continuous-batching --device cpu --dtype D --max-model-len L`
  (needs `accelerate` for `--device`), started once.
`offline` is the same requests through `Mixtral.generate` in this process, 8 prompts a batch in workload
order, each batch generating its longest `max_tokens` for every row without stopping at EOS (all of them
counted): the throughput a server at 8 clients is held against ("of offline").

The checkpoint (default `common.CHECKPOINT`, made by `common.make_checkpoint` if missing) gets Mixtral's
SentencePiece model as `tokenizer.model` (ours reads it) and the transformers tokenizer files made from it
(`tokenizer.json`, `tokenizer_config.json`, adding BOS as ours does). The clients share the machine with
the server they load. Nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks import common

SERVERS = ("offline", "ours", "transformers")
PROMPT_TOKENS, MAX_TOKENS = (16, 400), (16, 128)  # inclusive ranges of the full workload
QUICK_PROMPT_TOKENS, QUICK_MAX_TOKENS = (16, 96), (8, 24)
OFFLINE_BATCH = 8
START_TIMEOUT_S = 1800  # our server compiles every prompt bucket before it answers /health
STOP_TIMEOUT_S = 30


@dataclasses.dataclass(frozen=True)
class Request:
    text: str
    ids: list[int]  # what the text encodes to, BOS first
    max_tokens: int


@dataclasses.dataclass
class Result:
    sent: float
    arrivals: list[float]  # perf_counter of each streamed chunk that carried text
    tokens: int
    error: str | None = None


# ---- checkpoint and workload -------------------------------------------------------------------------

def prepare(folder: Path) -> Path:
    """`folder` (made if it is the default and missing) with Mixtral's tokenizer in both servers' formats."""
    from mixtral_jax.tokenizer import default_tokenizer_path

    folder = folder.resolve()
    if folder == common.CHECKPOINT.resolve():
        common.make_checkpoint(folder)
    if not (folder / "config.json").exists():
        raise SystemExit(f"serve_load: {folder} is not a checkpoint folder (no config.json)")
    if not (folder / "tokenizer.model").exists():
        shutil.copyfile(default_tokenizer_path(), folder / "tokenizer.model")
    if not (folder / "tokenizer.json").exists():
        from transformers import LlamaTokenizer

        LlamaTokenizer.from_pretrained(folder, add_bos_token=True).save_pretrained(folder)
    return folder


def workload(folder: Path, n: int, prompt_tokens: tuple[int, int], max_tokens: tuple[int, int],
             seed: int = 0) -> list[Request]:
    """`n` requests: prompts of words that are one token each, lengths and limits drawn uniformly."""
    from mixtral_jax.tokenizer import Tokenizer

    tok = Tokenizer(folder / "tokenizer.model")
    words = []
    for i in range(tok.vocab_size):
        piece = tok.id_to_piece(i)
        word = piece[1:]
        if piece.startswith("\u2581") and len(word) > 2 and word.isascii() and word.isalpha() and word.islower():
            if tok.encode(word, bos=False) == [i]:
                words.append(word)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_tokens[0], prompt_tokens[1] + 1, n)
    limits = rng.integers(max_tokens[0], max_tokens[1] + 1, n)
    out = []
    for length, limit in zip(lengths, limits):
        text = " ".join(rng.choice(words, int(length) - 1))
        ids = tok.encode(text)
        if len(ids) != length:
            raise SystemExit(f"serve_load: a {length}-token prompt encodes to {len(ids)} tokens")
        out.append(Request(text, ids, int(limit)))
    return out


def check_transformers_tokenizer(folder: Path, requests: list[Request]) -> None:
    """transformers serve must see the ids ours sees."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    for r in requests:
        if tok(r.text)["input_ids"] != r.ids:
            raise SystemExit(f"serve_load: transformers' tokenizer in {folder} encodes a prompt differently "
                             f"from tokenizer.model; delete its tokenizer.json to have it made again")


# ---- servers -----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process leading its own process group (so its workers stop with it), logging to `log`."""

    def __init__(self, name: str, argv: list[str], port: int, model: str, log: Path, env: dict | None = None):
        self.name, self.port, self.model, self.log = name, port, model, log
        self.url = f"http://127.0.0.1:{port}/v1"
        print(f"serve_load: starting {name}: {' '.join(argv)}", file=sys.stderr, flush=True)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **(env or {})})

    def wait_ready(self) -> float:
        """Seconds until `GET /health` answers 200."""
        start = time.perf_counter()
        while time.perf_counter() - start < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise SystemExit(f"serve_load: {self.name} exited with {self.proc.returncode} while starting:\n"
                                 f"{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        raise SystemExit(f"serve_load: {self.name} did not answer /health in {START_TIMEOUT_S} s:\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL to what is left of it after STOP_TIMEOUT_S."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def start(name: str, folder: Path, args: argparse.Namespace, slots: int, max_len: int, logs: Path) -> Server:
    port = free_port()
    common_flags = ["--dtype", args.dtype, "--host", "127.0.0.1", "--port", str(port)]
    if name == "ours":
        argv = [sys.executable, "-m", "mixtral_jax", "serve", "--checkpoint", str(folder), "--max-slots", str(slots),
                "--max-len", str(max_len), "--model-name", "mixtral-jax", *common_flags, *shlex.split(args.ours_flags)]
        label = f"ours ({slots} slot{'s' if slots > 1 else ''})"
        return Server(label, argv, port, "mixtral-jax", logs / f"ours-{slots}.log")
    argv = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--continuous-batching",
            "--device", args.device, "--max-model-len", str(max_len), *common_flags]
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    return Server("transformers", argv, port, str(folder), logs / "transformers.log", env)


# ---- clients -----------------------------------------------------------------------------------------

async def one(client, model: str, request: Request, max_tokens: int) -> Result:
    sent = time.perf_counter()
    arrivals: list[float] = []
    tokens = None
    try:
        stream = await client.completions.create(
            model=model, prompt=request.text, max_tokens=max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                arrivals.append(time.perf_counter())
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # a failed request is counted and reported; the run goes on
        return Result(sent, arrivals, 0, f"{type(e).__name__}: {e}")
    return Result(sent, arrivals, len(arrivals) if tokens is None else tokens)


async def load(url: str, model: str, requests: list[Request], clients: int,
               max_tokens: int | None = None) -> tuple[list[Result], float]:
    """`clients` concurrent clients through `requests` (each limit capped at `max_tokens`): results, seconds."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600.0)
    pending = iter(requests)
    results: list[Result] = []

    async def worker() -> None:
        for r in pending:
            results.append(await one(client, model, r, min(r.max_tokens, max_tokens or r.max_tokens)))

    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(clients)))
    finally:
        await client.close()
    return results, time.perf_counter() - start


def summarise(results: list[Result], seconds: float) -> dict[str, float]:
    ok = [r for r in results if r.error is None]
    ttft = [r.arrivals[0] - r.sent for r in ok if r.arrivals]
    itl = [b - a for r in ok for a, b in zip(r.arrivals, r.arrivals[1:])]
    tpot = [(r.arrivals[-1] - r.arrivals[0]) / (r.tokens - 1) for r in ok if r.arrivals and r.tokens > 1]

    def ms(xs: list[float], q: float) -> float | int:
        v = 1e3 * float(np.percentile(xs, q)) if xs else float("nan")
        return round(v) if v >= 100 else v  # whole milliseconds, not 1.1e+03

    return {"tok_s": sum(r.tokens for r in ok) / seconds, "req_s": len(ok) / seconds,
            "ttft50": ms(ttft, 50), "ttft99": ms(ttft, 99), "itl50": ms(itl, 50), "itl99": ms(itl, 99),
            "tpot50": ms(tpot, 50), "failed": len(results) - len(ok)}


def run_server(server: Server, requests: list[Request], clients: int) -> dict[str, float]:
    """A short warm-up (the first `clients` requests, 2 tokens each), then the timed run."""
    asyncio.run(load(server.url, server.model, requests[:clients], clients, max_tokens=2))
    results, seconds = asyncio.run(load(server.url, server.model, requests, clients))
    for r in results:
        if r.error is not None:
            print(f"serve_load: {server.name}: a request failed: {r.error}", file=sys.stderr)
            break
    return summarise(results, seconds)


def offline(folder: Path, requests: list[Request], dtype: str) -> dict[str, float]:
    """`generate` over the requests, OFFLINE_BATCH a batch; a first pass compiles, the second is timed."""
    import mixtral_jax

    model = mixtral_jax.load(folder, dtype=dtype)
    batches = [requests[i:i + OFFLINE_BATCH] for i in range(0, len(requests), OFFLINE_BATCH)]

    def run() -> int:
        return sum(len(row) for b in batches
                   for row in model.generate([r.ids for r in b], max(r.max_tokens for r in b), stop_at_eos=False))

    run()
    start = time.perf_counter()
    tokens = run()
    seconds = time.perf_counter() - start
    return {"tok_s": tokens / seconds, "req_s": len(requests) / seconds}


# ---- main --------------------------------------------------------------------------------------------

def _list(text: str, kind=str) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through the `finally` that stops the servers
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=_list, default=list(SERVERS), help="of offline, ours, transformers")
    parser.add_argument("--concurrency", type=lambda t: _list(t, int), help="client counts (default 1,8,32)")
    parser.add_argument("--requests", type=int, help="requests per run (default 128)")
    parser.add_argument("--checkpoint", type=Path, default=common.CHECKPOINT, help="Hugging Face checkpoint folder")
    parser.add_argument("--max-slots", type=int, help="our server's slots (default: one per client)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--ours-flags", default="", help='more flags for our server, e.g. "--steps 2"')
    parser.add_argument("--device", default="cpu", help="transformers serve's --device (ours: JAX's default)")
    parser.add_argument("--quick", action="store_true", help="8 short requests at 1 and 4 clients: does it run")
    args = parser.parse_args()
    unknown = set(args.servers) - set(SERVERS)
    if unknown:
        parser.error(f"--servers: unknown {', '.join(sorted(unknown))} (choose from {', '.join(SERVERS)})")
    try:
        import openai  # noqa: F401
    except ImportError:
        raise SystemExit("serve_load: the clients need the `openai` package: pip install openai") from None
    if "transformers" in args.servers:
        try:
            import accelerate  # noqa: F401
            import fastapi  # noqa: F401
            import transformers  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as e:
            raise SystemExit(f"serve_load: transformers serve needs `{e.name}`: pip install {e.name}") from None
    levels = args.concurrency or ([1, 4] if args.quick else [1, 8, 32])
    n = args.requests or (8 if args.quick else 128)
    prompt_tokens, max_tokens = (QUICK_PROMPT_TOKENS, QUICK_MAX_TOKENS) if args.quick else (PROMPT_TOKENS, MAX_TOKENS)

    folder = prepare(args.checkpoint)
    requests = workload(folder, n, prompt_tokens, max_tokens)
    if "transformers" in args.servers:
        check_transformers_tokenizer(folder, requests)
    max_len = max(len(r.ids) + r.max_tokens for r in requests)
    print(common.machine())
    print(f"{n} requests: prompts {min(len(r.ids) for r in requests)}-{max(len(r.ids) for r in requests)} tokens "
          f"(mean {np.mean([len(r.ids) for r in requests]):.0f}), max_tokens {min(r.max_tokens for r in requests)}-"
          f"{max(r.max_tokens for r in requests)} (mean {np.mean([r.max_tokens for r in requests]):.0f}); "
          f"{folder}, {args.dtype}", flush=True)

    rows = []
    base = None
    if "offline" in args.servers:
        r = offline(folder, requests, args.dtype)
        base = r["tok_s"]
        rows.append([f"offline generate, batch {OFFLINE_BATCH}", "-", r["tok_s"], r["req_s"], *["-"] * 6, 1.0])
        print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory(prefix="serve_load-") as logs:
        for name in (s for s in SERVERS if s in args.servers and s != "offline"):
            server, running = None, None
            try:
                for clients in levels:
                    slots = args.max_slots or clients
                    wanted = slots if name == "ours" else None  # transformers serve sizes its batches itself
                    if server is None or wanted != running:
                        if server is not None:
                            server.stop()
                        server, running = start(name, folder, args, slots, max_len, Path(logs)), wanted
                        print(f"serve_load: {server.name} ready in {server.wait_ready():.0f} s", file=sys.stderr,
                              flush=True)
                    r = run_server(server, requests, clients)
                    rows.append([server.name, clients, r["tok_s"], r["req_s"], r["ttft50"], r["ttft99"], r["itl50"],
                                 r["itl99"], r["tpot50"], r["failed"], r["tok_s"] / base if base else "-"])
                    print(rows[-1], flush=True)
            finally:
                if server is not None:
                    server.stop()
    print(common.table(["server", "clients", "output tok/s", "req/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
                        "ITL p99 ms", "TPOT p50 ms", "failed", "of offline"], rows))


if __name__ == "__main__":
    main()
