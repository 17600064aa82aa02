"""The thread that owns the decode slots: it admits waiting requests into free slots, runs decode rounds, and
hands each request its text as it completes.

A request ends on EOS, on its token limit, on one of its stop strings (the text up to it is returned, the
stop string is not), or when its client goes away; its slot is free for the next request at once. Text
that could be the start of a stop string is held back until it is known not to be.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from collections.abc import Callable

from mixtral_jax.distributed import broadcast_json
from mixtral_jax.engine import Engine, Tokens
from mixtral_jax.errors import MixtralError
from mixtral_jax.tokenizer import StreamDecoder, Tokenizer


@dataclasses.dataclass
class TokenLogprobs:
    """A new token's log-probability and its likeliest alternatives (id, log-probability), best first."""

    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Job:
    """One choice of a request: what to run, where its events go (`(index, "text", (str, tokens))`, then
    `(index, "end", finish_reason)` or `(index, "error", message)`, with `index` the choice's; `tokens` are the
    log-probabilities of the tokens that text completes, when `logprobs` asks for them), and what the
    scheduler has made of it."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    stops: list[str]
    logprobs: int | None  # alternatives per token to report; None: no log-probabilities
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # shared by the choices of one request
    presence: float = 0.0  # OpenAI's presence and frequency penalties
    frequency: float = 0.0
    logit_bias: dict[int, float] | None = None
    index: int = 0  # the choice's index in its request
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    decoder: StreamDecoder | None = None
    held: str = ""  # text that may begin a stop string
    held_tokens: list[TokenLogprobs] = dataclasses.field(default_factory=list)  # the tokens it and `held` come from
    tokens: int = 0
    finished: bool = False
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    last_token: float | None = None

    def request(self) -> list:
        """`Engine.admit`'s arguments."""
        return [self.prompt, self.max_tokens, self.temperature, self.top_k, self.top_p, self.seed, True,
                self.logprobs is not None, self.presence, self.frequency, self.logit_bias]

    def send(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, value))


@dataclasses.dataclass
class Plan:
    """What one round does, decided by process 0 and run by every process alike: the slots to cancel, the
    requests to admit (`Engine.admit`'s arguments), and whether to stop instead."""

    cancel: list[int]
    admit: list[list]
    stop: bool = False


@dataclasses.dataclass
class Outcome:
    """What a round's decode gave: its new tokens (None if nothing was decoding), and the slots whose request
    ended there."""

    new: Tokens | None
    ended: list[int]


def run_round(engine: Engine, plan: Plan, admitted: Callable[[list[int | str]], None] | None = None,
              ready: Callable[[int, Tokens], None] | None = None) -> Outcome:
    """`plan` on `engine`: cancels, admissions (handed to `admitted`), about one chunk of prefill (each first
    token handed to `ready` as its prompt completes, before the decode round), then one decode round: the
    engine's steps while every slot is busy decoding, one step while a slot is free or a prompt waits for its
    prefill, so that such a request waits one step for the next round, not `steps`. Every process of a
    multi-host server runs the same plans in the same order, so their engines stay alike."""
    for slot in plan.cancel:
        engine.cancel(slot)
    slots = []
    for request in plan.admit:
        try:
            slots.append(engine.admit(*request))
        except MixtralError as e:
            slots.append(str(e))
    if admitted is not None:
        admitted(slots)
    engine.prefill(ready=ready)
    new = engine.step(1 if engine.free() or engine.pending else None) if engine.decoding() else None
    return Outcome(new, engine.finished())


def broadcast(plan: Plan | None) -> Plan:
    """Process 0's `plan` on every process of a multi-host server (the others pass None)."""
    return Plan(**broadcast_json(None if plan is None else dataclasses.asdict(plan)))


def follow(engine: Engine, sync: Callable[[Plan | None], Plan] = broadcast) -> None:
    """The loop of a process other than 0: run each plan process 0 sends until it says stop; a round that
    fails frees every slot, as it does on process 0."""
    while not (plan := sync(None)).stop:
        try:
            run_round(engine, plan)
        except Exception:
            engine.reset()


class Scheduler(threading.Thread):
    """Runs `engine` for the jobs `submit` hands it; `observe(name, value)` is told each token's latency
    (`"ttft"`, `"itl"`), each job's outcome and token counts, the queue depth and the busy slots. `sync`
    hands each round's plan to the other processes of a multi-host server (and returns it)."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, observe: Callable[[str, float], None],
                 sync: Callable[[Plan | None], Plan] | None = None):
        super().__init__(name="mixtral-jax-scheduler", daemon=True)
        self.engine, self.tokenizer, self.observe = engine, tokenizer, observe
        self.sync = sync or (lambda plan: plan)
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.running: dict[int, Job] = {}
        self.stopping = threading.Event()

    def submit(self, job: Job) -> None:
        job.decoder = StreamDecoder(self.tokenizer)
        self.waiting.put(job)
        self.observe("queue", self.waiting.qsize())

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._round()
            except Exception as e:  # the running requests fail, not the server
                self.engine.reset()
                for slot in list(self.running):
                    self._fail(self.running.pop(slot), f"generation failed: {e}")
        self.sync(Plan([], [], stop=True))

    def _round(self) -> None:
        """Plan (cancel what ended or was cancelled, admit waiting jobs into the free slots), hand the plan to
        every process, run it, and give each job its tokens."""
        cancel = [slot for slot, job in self.running.items() if job.finished or job.cancelled.is_set()]
        for slot in cancel:
            self._freed(self.running.pop(slot))
        jobs = self._waiting(len(self.engine.free()) + len(cancel))

        def admitted(slots: list[int | str]) -> None:
            for job, slot in zip(jobs, slots):
                if isinstance(slot, str):
                    self._fail(job, slot)
                else:
                    self.running[slot] = job
            self.observe("busy", len(self.running))

        def ready(slot: int, first: Tokens) -> None:  # a first token goes out before the decode round runs
            self._take(self.running[slot], first, 0, time.perf_counter())

        outcome = run_round(self.engine, self.sync(Plan(cancel, [job.request() for job in jobs])), admitted, ready)
        if outcome.new is not None:
            new, now = outcome.new, time.perf_counter()
            for slot, job in list(self.running.items()):
                for step in range(new.ids.shape[0]):
                    if new.ids[step, slot] >= 0 and not job.finished:
                        self._take(job, new.take(step), slot, now)
        for slot in outcome.ended:
            self._freed(self.running.pop(slot))

    def _waiting(self, room: int) -> list[Job]:
        """Up to `room` waiting jobs not cancelled meanwhile; with nothing running, wait a moment for one."""
        jobs = []
        while len(jobs) < room:
            try:
                job = self.waiting.get(timeout=0.05) if not (self.running or jobs) else self.waiting.get_nowait()
            except queue.Empty:
                break
            self.observe("queue", self.waiting.qsize())
            if job.cancelled.is_set():
                self._freed(job)
            else:
                jobs.append(job)
        return jobs

    def _take(self, job: Job, new: Tokens, slot: int, now: float) -> None:
        """One new token of `job`, column `slot` of `new`: its text, checked against the stop strings."""
        self.observe("ttft" if job.last_token is None else "itl", now - (job.last_token or job.submitted))
        job.last_token = now
        job.tokens += 1
        token = int(new.ids[slot])
        if token == self.tokenizer.eos_id:
            return self._finish(job, "stop")
        if job.logprobs is not None:
            top = zip(new.top_ids[slot, : job.logprobs].tolist(), new.top_logprob[slot, : job.logprobs].tolist())
            job.held_tokens.append(TokenLogprobs(token, float(new.logprob[slot]), list(top)))
        text = job.held + job.decoder.push(token)
        if job.tokens >= job.max_tokens:
            text += job.decoder.flush()
        cut = min((i for i in (text.find(s) for s in job.stops) if i >= 0), default=-1)
        if cut >= 0:
            if cut:
                self._send(job, text[:cut])
            job.held = ""
            return self._finish(job, "stop")
        keep = 0 if job.tokens >= job.max_tokens else _stop_prefix(text, job.stops)
        job.held = text[len(text) - keep:] if keep else ""
        if len(text) > keep:
            self._send(job, text[: len(text) - keep])
        if job.tokens >= job.max_tokens:
            self._finish(job, "length")

    def _send(self, job: Job, text: str) -> None:
        """`text` to the client, with the log-probabilities of the tokens held until now."""
        job.send("text", (text, job.held_tokens))
        job.held_tokens = []

    def _finish(self, job: Job, reason: str) -> None:
        job.finished = True
        self.observe("outcome:" + reason, 1)
        self.observe("completion_tokens", job.tokens)
        job.send("end", reason)

    def _freed(self, job: Job) -> None:
        """A job whose slot is freed: finished already, or cancelled by its client."""
        if not job.finished:
            self._finish(job, "cancelled")

    def _fail(self, job: Job, message: str) -> None:
        job.finished = True
        self.observe("outcome:error", 1)
        job.send("error", message)


def _stop_prefix(text: str, stops: list[str]) -> int:
    """The length of the longest end of `text` that begins some stop string (to be held back)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[len(text) - n:]):
                best = n
                break
    return best
