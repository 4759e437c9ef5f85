"""Calls to the inference workers, shared by the routes that make them: the inference rate limit,
the decoding options, a chat answer (whole or streamed), other tasks, and SSE relaying. The API
itself loads no model."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeout
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from api.deps import SSE_HEADERS
from core.auth import Principal
from core.errors import InferenceTimeout, MedtuneError
from core.inference.remote import AnswerStream, ask, stream_answer
from core.inference.stream import channel_for
from core.queue import INFER_QUEUE
from core.ratelimit import RateLimiter
from core.settings import Settings


def count_inference(limiter: RateLimiter, principal: Principal, settings: Settings) -> None:
    """Take one request off the caller's inference limit (RateLimited when none is left)."""
    limiter.hit(
        "infer", principal.scope, per_minute=settings.rate_infer_per_minute, what="inferences"
    )


def decoding_options(
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    repetition_penalty: float,
    stop: list[str] | None,
) -> dict[str, Any]:
    """The decoding part of an inference task's kwargs, the same for /infer and
    /v1/chat/completions; an option left at its default is not sent."""
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
    }
    if repetition_penalty != 1.0:
        options["repetition_penalty"] = repetition_penalty
    if stop:
        options["stop"] = stop
    return options


def ask_inference_worker(
    queue: Any, settings: Settings, *, args: list[Any], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The worker's whole answer to a chat; a domain error it reported is raised here."""
    return ask(
        queue, channel_for(settings), args=args, kwargs=kwargs, timeout_s=settings.infer_timeout_s
    )


def stream_inference_worker(
    queue: Any, settings: Settings, *, args: list[Any], kwargs: dict[str, Any]
) -> AnswerStream:
    """The worker's answer to a chat as events; an error before its first text is raised here,
    so the route can still answer it as problem+json."""
    return stream_answer(
        queue, channel_for(settings), args=args, kwargs=kwargs, timeout_s=settings.infer_timeout_s
    )


def call_inference_worker(
    queue: Any,
    task: str,
    *,
    args: list[Any],
    kwargs: dict[str, Any] | None = None,
    timeout_s: float,
) -> dict[str, Any]:
    """The task's result; a domain error the worker reported is raised here with its status."""
    pending = queue.send_task(task, args=args, kwargs=kwargs or {}, queue=INFER_QUEUE)
    try:
        result: dict[str, Any] = pending.get(timeout=timeout_s)
    except CeleryTimeout as exc:
        pending.revoke()
        raise InferenceTimeout(
            f"no inference worker answered within {timeout_s:.0f} s; is a worker consuming the "
            f"{INFER_QUEUE} queue?",
        ) from exc
    if "error" in result:
        raise MedtuneError.from_dict(result["error"])
    return result


def relay_sse(chunks: Iterator[str], *, on_disconnect: Callable[[], None]) -> StreamingResponse:
    """Server-Sent Events from a blocking iterator; ``on_disconnect`` runs as soon as the client
    leaves before the end. Starlette abandons a blocking iterator then without closing it, so
    the worker would go on generating an answer nobody reads."""

    async def relay() -> AsyncIterator[str]:
        finished = False
        try:
            async for chunk in iterate_in_threadpool(chunks):
                yield chunk
            finished = True
        finally:
            if not finished:
                on_disconnect()

    return StreamingResponse(relay(), media_type="text/event-stream", headers=SSE_HEADERS)
