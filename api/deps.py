"""Dependencies injected into routes, overridable in tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse
from sqlmodel import Session

from api import problems
from core import auth
from core.errors import MedtuneError
from core.queue import make_celery
from core.ratelimit import RateLimited, RateLimiter
from core.settings import Settings, get_settings
from core.store import idempotency
from core.store.db import get_engine


async def get_session(
    settings: Annotated[Settings, Depends(get_settings)],
) -> AsyncIterator[Session]:
    """A request's session, opened and closed on the event loop: giving its connection back
    never waits for a worker thread (api/admission.py says why that matters)."""
    session = Session(get_engine(settings.db_url), expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()


_queues: dict[tuple[str, str], Any] = {}


def get_queue(settings: Annotated[Settings, Depends(get_settings)]) -> Any:
    """One Celery client per broker/backend pair; it only sends tasks by name."""
    key = (settings.celery_broker_url, settings.celery_result_backend)
    if key not in _queues:
        _queues[key] = make_celery(settings)
    return _queues[key]


def auth_mode(request: Request, settings: Settings) -> str:
    """``required``, ``disabled`` or ``disabled (loopback only)`` for this request."""
    return auth.mode(
        settings, server=request.scope.get("server"), client=request.scope.get("client")
    )


def get_principal(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    session: Annotated[Session, Depends(get_session)],
) -> auth.Principal:
    """Who sent the request: the Bearer key's owner, or anonymous when auth is off."""
    if auth_mode(request, settings) != "required":
        return auth.ANONYMOUS
    principal = auth.authenticate(session, settings, request.headers.get("authorization"))
    session.commit()  # end the lookup's transaction: no connection held while the route waits
    return principal


def get_limiter(request: Request) -> RateLimiter:
    return request.app.state.rate_limiter  # type: ignore[no-any-return]


async def _problem_with_headers(request: Request, exc: MedtuneError) -> JSONResponse:
    response = await problems.medtune_handler(request, exc)
    response.headers.update(getattr(exc, "headers", {}))
    return response


def install_security(app: FastAPI) -> None:
    """The app's rate limiter, and 401/429 problems that carry WWW-Authenticate/Retry-After."""
    app.state.rate_limiter = RateLimiter()
    for error in (auth.Unauthorized, RateLimited):
        app.add_exception_handler(error, _problem_with_headers)  # type: ignore[arg-type]


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
QueueDep = Annotated[Any, Depends(get_queue)]
PrincipalDep = Annotated[auth.Principal, Depends(get_principal)]
LimiterDep = Annotated[RateLimiter, Depends(get_limiter)]


IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias=idempotency.HEADER,
        min_length=1,
        max_length=255,
        description="Retrying with the same key returns the job the first request created "
        "(201, Idempotent-Replayed: true) and queues nothing; a different spec is a 409.",
    ),
]

# Server-sent events: no caching, and no buffering by a proxy in front (nginx reads the header).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
