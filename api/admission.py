"""Admission control: at most N requests at a time between arrival and their response's start.

A request's database session can hold a pooled connection while the request waits for a
worker thread (FastAPI runs sync dependencies, routes and response validation on a pool of 40
threads). Under 200 pollers every thread ended up waiting for a connection that a request
waiting for a thread held: the API stopped answering until the pool timed out (the soak in
BENCHMARKS.md). Capping the requests in that phase below the connection pool's size keeps
connections free for the threads that run, so every request makes progress. A request waits
for its turn on the event loop, holding neither a thread nor a connection. The slot is given
back when the response starts, so a long Server-Sent Events stream does not keep one.
"""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class AdmissionLimit:
    """Pure ASGI middleware; past ``wait_s`` in the queue a request gets 503 ``server_busy``."""

    def __init__(self, app: ASGIApp, *, limit: int, wait_s: float = 30.0) -> None:
        self.app, self.limit, self.wait_s = app, limit, wait_s
        self._slots: asyncio.Semaphore | None = None  # made on the loop that serves

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limit)
        slots = self._slots
        try:
            await asyncio.wait_for(slots.acquire(), timeout=self.wait_s)
        except TimeoutError:
            await _busy(send, self.wait_s)
            return
        held = True

        async def send_and_release(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and held:
                held = False
                slots.release()
            await send(message)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            if held:
                slots.release()


async def _busy(send: Send, waited_s: float) -> None:
    body = json.dumps(
        {
            "type": "about:blank",
            "title": "Server busy",
            "status": 503,
            "detail": f"the server had no free request slot for {waited_s:g} s; retry shortly",
            "code": "server_busy",
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"retry-after", b"2"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
