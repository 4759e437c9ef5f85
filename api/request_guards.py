"""Refuse NUL characters in the URL and the headers before any handler runs.

Postgres text cannot hold NUL (0x00): a job id, cursor or Idempotency-Key carrying one failed
inside the database driver and came back as a plain 500. No medtune path, query value or header
needs one, so such a request is a 400 problem naming where the NUL was.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.problems import problem


def nul_at(scope: Scope) -> str | None:
    """Where a request carries a NUL: 'path', a query parameter's or a header's name; or None."""
    if "\x00" in scope.get("path", ""):
        return "path"
    query = scope.get("query_string", b"").decode("latin-1")
    for key, value in parse_qsl(query, keep_blank_values=True):
        if "\x00" in key or "\x00" in value:
            return key.replace("\x00", "") or "query"
    for name, value in scope.get("headers", []):
        if b"\x00" in value or b"\x00" in name:
            return name.replace(b"\x00", b"").decode("latin-1") or "headers"
    return None


class RefuseNulBytes:
    """Pure ASGI middleware: a NUL anywhere in the URL or the headers is a 400 problem."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        where = nul_at(scope) if scope["type"] == "http" else None
        if where is None:
            await self.app(scope, receive, send)
            return
        response = problem(
            Request(scope),
            status=400,
            code="invalid_characters",
            title="Invalid request",
            detail=f"{where} contains a NUL character (%00); remove it",
            field=where,
        )
        await response(scope, receive, send)
