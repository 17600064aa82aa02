"""The HTTP routes: OpenAI's completions and chat completions (streamed as server-sent events or whole),
models, health and Prometheus metrics. Bad input is a 4xx with OpenAI's error body; the server goes on."""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mixtral_jax.errors import MixtralError
from mixtral_jax.sampling import checked_bias
from mixtral_jax.serve import MAX_BODY_BYTES, MAX_QUEUE
from mixtral_jax.serve.limits import Limits
from mixtral_jax.serve.protocol import ChatRequest, CompletionRequest, Sampling, error_body
from mixtral_jax.serve.scheduler import Job, Scheduler, TokenLogprobs
from mixtral_jax.tokenizer import SAFE_PROMPT

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mixtral_requests", "requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("mixtral_prompt_tokens", "prompt tokens admitted", registry=r)
        self.completion_tokens = Counter("mixtral_completion_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("mixtral_time_to_first_token_seconds", "from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mixtral_inter_token_latency_seconds", "between a request's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("mixtral_queue_depth", "requests waiting for a slot", registry=r)
        self.busy = Gauge("mixtral_busy_slots", "slots running a request", registry=r)

    def observe(self, name: str, value: float) -> None:
        if name.startswith("outcome:"):
            self.requests.labels(name.split(":", 1)[1]).inc(value)
        elif name == "completion_tokens":
            self.completion_tokens.inc(value)
        elif name == "ttft":
            self.ttft.observe(value)
        elif name == "itl":
            self.itl.observe(value)
        elif name == "queue":
            self.queue.set(value)
        elif name == "busy":
            self.busy.set(value)


def create_app(scheduler: Scheduler, metrics: Metrics, model_name: str, max_len: int,
               api_key: str | None = None, max_queue: int = MAX_QUEUE, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The routes over a started `scheduler`: at most `max_queue` generation requests wait for a slot (429
    past them), and no request body is over `max_body_bytes` (413)."""
    app = FastAPI(title="mixtral-jax")
    app.add_middleware(Limits, max_body_bytes=max_body_bytes, capacity=scheduler.engine.n_slots + max_queue,
                       generating=("/v1/completions", "/v1/chat/completions"), observe=metrics.observe)
    tokenizer, max_logprobs, n_slots = scheduler.tokenizer, scheduler.engine.n_logprobs, scheduler.engine.n_slots
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        metrics.requests.labels("rejected").inc()
        return _error(e.status, str(e), e.kind, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        metrics.requests.labels("rejected").inc()
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        return _error(400, f"{where}: {first.get('msg', 'invalid')}", param=where)

    @app.middleware("http")
    async def authorise(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").encode()  # bytes: any header compares
            if not secrets.compare_digest(given, f"Bearer {api_key}".encode()):  # in a time that leaks no prefix
                return _error(401, "a valid API key is required (Authorization: Bearer KEY)", "authentication_error",
                              code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "mixtral-jax", "max_model_len": max_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.echo:
            raise ApiError(400, "echo: returning the prompt with the completion is not supported", "echo")
        if body.suffix:
            raise ApiError(400, "suffix: completing text before a suffix is not supported", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise ApiError(400, "best_of: only best_of equal to n (every choice returned) is supported", "best_of")
        prompt = body.prompt if isinstance(body.prompt, list) else _encode(lambda: tokenizer.encode(body.prompt))
        return await _respond(body, prompt, body.max_tokens, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        for name in ("tools", "functions"):
            if getattr(body, name):
                raise ApiError(400, f"{name}: function calling is not supported", name)
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise ApiError(400, "response_format: only the type text is supported (no JSON mode or schema)",
                           "response_format")
        messages = [m.model_dump() for m in body.messages]
        if body.safe_prompt:
            messages = [{"role": "system", "content": SAFE_PROMPT}, *messages]
        prompt = _encode(lambda: tokenizer.encode_chat(messages))
        return await _respond(body, prompt, body.max_completion_tokens or body.max_tokens, request, chat=True)

    async def _respond(body: Sampling, prompt: list[int], max_tokens: int | None, request: Request, chat: bool):
        if body.model is not None and body.model != model_name:
            raise ApiError(400, f"model: this server serves {model_name!r}, not {body.model!r}", "model",
                           "model_not_found")
        if body.n > n_slots:
            raise ApiError(400, f"n: at most {n_slots} choices per request (the server's slots)", "n")
        top = _logprobs_asked(body, chat)
        if top is not None and top > max_logprobs:
            name = "top_logprobs" if chat else "logprobs"
            raise ApiError(400, f"{name}: at most {max_logprobs} alternatives per token (the server's "
                                "--max-logprobs)", name)
        if not prompt or min(prompt) < 0 or max(prompt) >= tokenizer.vocab_size:
            raise ApiError(400, f"prompt: token ids must be in [0, {tokenizer.vocab_size})", "prompt")
        room = max_len - len(prompt)
        if room < 1:
            raise ApiError(400, f"prompt: {len(prompt)} tokens leave no room in the context of {max_len}", "prompt")
        max_tokens = room if max_tokens is None else max_tokens
        if max_tokens > room:
            raise ApiError(400, f"max_tokens: {len(prompt)} prompt tokens + {max_tokens} exceed the context of "
                                f"{max_len}", "max_tokens")
        try:
            logit_bias = checked_bias(tokenizer.vocab_size, body.logit_bias) or None
        except MixtralError as e:
            raise ApiError(400, str(e), "logit_bias") from e
        metrics.prompt_tokens.inc(len(prompt))
        seed = body.seed if body.seed is not None else secrets.randbelow(2**32)
        events: asyncio.Queue = asyncio.Queue()
        jobs = [Job(prompt, max_tokens, body.temperature, body.top_k, None if body.top_p == 1 else body.top_p,
                    (seed + i) % 2**32, body.stops(), top, asyncio.get_running_loop(), events, body.presence_penalty,
                    body.frequency_penalty, logit_bias, i)
                for i in range(body.n)]
        for job in jobs:
            scheduler.submit(job)
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)

        def usage() -> dict:
            generated = sum(job.tokens for job in jobs)
            return {"prompt_tokens": len(prompt), "completion_tokens": generated,
                    "total_tokens": len(prompt) + generated}

        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_stream(jobs, events, ident, chat, include_usage, usage),
                                     media_type="text/event-stream")
        texts, tokens, reasons = [[] for _ in jobs], [[] for _ in jobs], [None for _ in jobs]
        watch = asyncio.create_task(_watch_disconnect(request, events))
        try:
            while None in reasons:
                index, kind, value = await events.get()
                if kind == "gone":
                    return Response(status_code=499)  # nobody reads it: the client has left
                if kind == "error":
                    raise ApiError(400, value)
                if kind == "text":
                    texts[index].append(value[0])
                    tokens[index] += value[1]
                else:
                    reasons[index] = value
        finally:
            watch.cancel()
            for job in jobs:
                job.cancelled.set()  # a client gone mid-wait frees the slots
        choices = []
        for index, (text, reason) in enumerate(zip(texts, reasons)):
            logprobs = None if top is None else _logprobs(tokenizer, tokens[index], chat)
            choices.append({"index": index, "message": {"role": "assistant", "content": "".join(text)},
                            "finish_reason": reason, "logprobs": logprobs} if chat else
                           {"index": index, "text": "".join(text), "finish_reason": reason, "logprobs": logprobs})
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name, "choices": choices, "usage": usage()}

    async def _stream(jobs: list[Job], events: asyncio.Queue, ident: str, chat: bool, include_usage: bool,
                      usage) -> AsyncIterator[str]:
        """The choices' text as server-sent events, each chunk one choice's (OpenAI's `index` says which), as its
        tokens come; the usage after every choice ended, then `[DONE]`."""
        kind_name = "chat.completion.chunk" if chat else "text_completion"
        wants_logprobs = jobs[0].logprobs is not None

        def event(choices: list[dict], usage_now: dict | None = None) -> str:
            body = {"id": ident, "object": kind_name, "created": int(time.time()), "model": model_name,
                    "choices": choices}
            if include_usage:  # null on every chunk but the last, as OpenAI sends it
                body["usage"] = usage_now
            return f"data: {json.dumps(body)}\n\n"

        def chunk(index: int, delta: str | None, reason: str | None, first: bool = False,
                  tokens: list | None = None) -> str:
            logprobs = None if not wants_logprobs or tokens is None else _logprobs(tokenizer, tokens, chat)
            if chat:
                d = {"role": "assistant", "content": delta or ""} if first else ({"content": delta} if delta else {})
                return event([{"index": index, "delta": d, "finish_reason": reason, "logprobs": logprobs}])
            return event([{"index": index, "text": delta or "", "finish_reason": reason, "logprobs": logprobs}])

        try:
            if chat:
                for job in jobs:
                    yield chunk(job.index, "", None, first=True)
            running = len(jobs)
            while running:
                index, kind, value = await events.get()
                if kind == "error":
                    yield f"data: {json.dumps({'error': {'message': value, 'type': 'invalid_request_error'}})}\n\n"
                    break
                if kind == "text":
                    yield chunk(index, value[0], None, tokens=value[1])
                    continue
                yield chunk(index, None, value)
                running -= 1
            else:
                if include_usage:
                    yield event([], usage())
            yield "data: [DONE]\n\n"
        finally:
            for job in jobs:
                job.cancelled.set()

    return app


async def _watch_disconnect(request: Request, events: asyncio.Queue) -> None:
    """Wait for the client of a whole (not streamed) response to leave, then end its wait: the server reads
    nothing more of the request once its body is in, so the next message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    events.put_nowait((0, "gone", None))


def _logprobs_asked(body: Sampling, chat: bool) -> int | None:
    """How many alternatives per token the request wants reported; None: no log-probabilities at all."""
    if chat:
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
        top = (body.top_logprobs or 0) if body.logprobs else None
    else:
        top = None if body.logprobs is None or body.logprobs is False else int(body.logprobs)
    if top is not None and top < 0:
        name = "top_logprobs" if chat else "logprobs"
        raise ApiError(400, f"{name}: must be >= 0", name)
    return top


def _logprobs(tokenizer, tokens: list[TokenLogprobs], chat: bool) -> dict:
    """OpenAI's `logprobs` of a choice: chat's `content` entries, or the completions' parallel lists."""
    def text(token_id: int) -> str:
        return tokenizer.token_bytes(token_id).decode("utf-8", "replace")

    if chat:
        def entry(token_id: int, logprob: float) -> dict:
            return {"token": text(token_id), "logprob": logprob, "bytes": list(tokenizer.token_bytes(token_id))}

        return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                            for t in tokens]}
    strings = [text(t.id) for t in tokens]
    offsets = list(itertools.accumulate(map(len, strings), initial=0))[:-1]
    return {"tokens": strings, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{text(i): lp for i, lp in t.top} for t in tokens], "text_offset": offsets}


def _encode(encode) -> list[int]:
    try:
        return encode()
    except (MixtralError, ValueError) as e:
        raise ApiError(400, f"messages: {e}", "messages") from e


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)
