"""What the server takes in, checked before a route runs: a request body of at most `max_body_bytes` (413
past it, whether the client sent a Content-Length or not), and on the generation routes at most `capacity`
requests at once, those in slots and those waiting for one (429 with `Retry-After` past it).

A plain ASGI middleware: a refused request costs no parsing, and a streamed response, with the client's
disconnect behind it, passes through untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mixtral_jax.serve.protocol import error_body

RETRY_AFTER_S = 1


class Limits:
    """In front of `app`: bodies up to `max_body_bytes`; up to `capacity` requests at once on the `generating`
    paths, from their arrival until their response (streamed or whole) has ended or their client has gone.
    `observe("outcome:rejected", 1)` hears of each refusal."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, capacity: int, generating: Collection[str],
                 observe: Callable[[str, float], None]):
        self.app, self.max_body_bytes, self.capacity = app, max_body_bytes, capacity
        self.generating, self.observe = frozenset(generating), observe
        self.in_flight = 0  # changed only on the event loop's thread

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        counted = scope["path"] in self.generating
        if counted and self.in_flight >= self.capacity:
            return await self._refuse(scope, receive, send, 429, "rate_limit_exceeded",
                                      f"the server is at capacity ({self.capacity} requests running or waiting "
                                      f"for a slot); retry after {RETRY_AFTER_S} s",
                                      {"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += counted
        try:
            try:
                body = await self._body(scope, receive)
            except _TooLarge:
                return await self._refuse(scope, receive, send, 413, "request_too_large",
                                          f"the request body exceeds {self.max_body_bytes} bytes")
            if body is not None:  # None: the client went away while sending it
                await self.app(scope, _replay(body, receive), send)
        finally:
            self.in_flight -= counted

    async def _body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body (`_TooLarge` as soon as it, or its Content-Length, is past the limit), or None if the
        client disconnected first."""
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            raise _TooLarge
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_body_bytes:
                raise _TooLarge
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, code: str, message: str,
                      headers: dict[str, str] | None = None) -> None:
        self.observe("outcome:rejected", 1)
        kind = "rate_limit_error" if status == 429 else "invalid_request_error"
        await JSONResponse(error_body(message, kind, code=code), status, headers)(scope, receive, send)


class _TooLarge(Exception):
    pass


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` with `body` given first, whole: the route reads it, then hears of a disconnect as before."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed
