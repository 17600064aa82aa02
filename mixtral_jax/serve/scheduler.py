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

from mixtral_jax.engine import Engine
from mixtral_jax.errors import MixtralError
from mixtral_jax.tokenizer import StreamDecoder, Tokenizer


@dataclasses.dataclass
class Job:
    """One request: what to run, where its events go (`("text", str)`, then `("end", finish_reason)` or
    `("error", message)`), and what the scheduler has made of it."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    decoder: StreamDecoder | None = None
    held: str = ""  # text that may begin a stop string
    tokens: int = 0
    finished: bool = False
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    last_token: float | None = None

    def send(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Scheduler(threading.Thread):
    """Runs `engine` for the jobs `submit` hands it; `observe(name, value)` is told each token's latency
    (`"ttft"`, `"itl"`), each job's outcome and token counts, the queue depth and the busy slots."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, observe: Callable[[str, float], None]):
        super().__init__(name="mixtral-jax-scheduler", daemon=True)
        self.engine, self.tokenizer, self.observe = engine, tokenizer, observe
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
                for slot in list(self.running):
                    self.engine.busy.discard(slot)
                    self._fail(self.running.pop(slot), f"generation failed: {e}")

    def _round(self) -> None:
        """Admit what fits, then one decode round over the slots."""
        self._admit()
        self.observe("busy", len(self.running))
        if not self.running:
            return
        new = self.engine.step()
        now = time.perf_counter()
        for slot, job in list(self.running.items()):
            for token in new[:, slot]:
                if token >= 0 and not job.finished:
                    self._take(job, int(token), now)
        for slot in self.engine.finished():
            self._freed(self.running.pop(slot))
        for slot, job in list(self.running.items()):
            if job.finished or job.cancelled.is_set():
                self.engine.cancel(slot)
                self._freed(self.running.pop(slot))

    def _admit(self) -> None:
        """Waiting jobs into free slots; with nothing running, wait a moment for one."""
        while self.engine.free():
            try:
                job = self.waiting.get(timeout=0.05) if not self.running else self.waiting.get_nowait()
            except queue.Empty:
                return
            self.observe("queue", self.waiting.qsize())
            if job.cancelled.is_set():
                self._freed(job)
                continue
            try:
                slot, first = self.engine.admit(job.prompt, job.max_tokens, job.temperature, job.top_k, job.top_p,
                                                job.seed)
            except MixtralError as e:
                self._fail(job, str(e))
                continue
            self.running[slot] = job
            self._take(job, first, time.perf_counter())

    def _take(self, job: Job, token: int, now: float) -> None:
        """One new token of `job`: its text, checked against the stop strings."""
        self.observe("ttft" if job.last_token is None else "itl", now - (job.last_token or job.submitted))
        job.last_token = now
        job.tokens += 1
        if token == self.tokenizer.eos_id:
            return self._finish(job, "stop")
        text = job.held + job.decoder.push(token)
        if job.tokens >= job.max_tokens:
            text += job.decoder.flush()
        cut = min((i for i in (text.find(s) for s in job.stops) if i >= 0), default=-1)
        if cut >= 0:
            if cut:
                job.send("text", text[:cut])
            job.held = ""
            return self._finish(job, "stop")
        keep = 0 if job.tokens >= job.max_tokens else _stop_prefix(text, job.stops)
        job.held = text[len(text) - keep:] if keep else ""
        if len(text) > keep:
            job.send("text", text[: len(text) - keep])
        if job.tokens >= job.max_tokens:
            self._finish(job, "length")

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
