"""Run a task on an inference worker and wait for its answer (the API itself loads no model)."""

from __future__ import annotations

from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeout

from core.errors import InferenceTimeout, MedtuneError
from core.queue import INFER_QUEUE


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
