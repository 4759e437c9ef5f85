"""What the inference task does: build the engine request, answer, stream.

Kept out of ``worker/tasks.py`` so the task stays a thin adapter and tests can drive it.
"""

from __future__ import annotations

import logging
from typing import Any

from core.embedded_model import gguf_path as embedded_gguf
from core.embedded_model import is_embedded
from core.errors import JobNotReady, MedtuneError
from core.inference.adapters import NoAdapter, job_gguf, job_merged
from core.inference.engine import InferenceCancelled, InferenceEngine, InferenceRequest
from core.inference.remote import job_target
from core.inference.stream import Channel, stop_flag
from core.settings import Settings
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus

log = logging.getLogger(__name__)


class InferenceFailed(MedtuneError):
    code = "inference_failed"
    status = 500


def build_request(
    settings: Settings,
    *,
    job_id: str | None,
    base_model: str | None,
    messages: list[dict[str, str]],
    use_adapter: bool,
    options: dict[str, Any],
    job: dict[str, Any] | None = None,
) -> InferenceRequest:
    """A request for a job's adapter (or its base), or for a bare base model (job_id None).

    ``job``: the job's ``job_target`` as the API sent it; without it (an older API, a caller
    that did not read the job) the job store is read here.
    """
    adapter_dir = gguf = merged = None
    load_in_4bit = True
    if job_id is not None:
        if job is None:
            with session_scope(settings.db_url) as s:
                job = job_target(jobs.get_job(s, job_id))
        base_model = job["base_model"]
        load_in_4bit = bool(job["load_in_4bit"])
        if use_adapter:
            if job["status"] != JobStatus.succeeded:
                raise JobNotReady(f"job {job_id} is {job['status']}, not succeeded", field="job_id")
            if not job["adapter_dir"]:
                raise NoAdapter(
                    f"job {job_id} finished without an adapter to answer with; ask its base "
                    "model (use_adapter false) or train it again",
                    field="job_id",
                )
            adapter_dir = job["adapter_dir"]
            gguf = job_gguf(job["artifacts_dir"])  # checked here: the files are the worker's
            merged = job_merged(job["artifacts_dir"])
    if base_model is None:
        raise MedtuneError("give a job or a base model", field="model", code="model_not_found")
    if adapter_dir is None and is_embedded(base_model):
        gguf = str(embedded_gguf())  # the shipped GGUF holds the embedded base's own weights
    return InferenceRequest(
        base_model=base_model,
        messages=messages,
        adapter_dir=adapter_dir,
        adapter_name=job_id if adapter_dir else None,
        gguf_path=gguf,
        merged_dir=merged,
        load_in_4bit=load_in_4bit,
        max_new_tokens=int(options.get("max_new_tokens", 256)),
        temperature=float(options.get("temperature", 0.0)),
        top_p=float(options.get("top_p", 1.0)),
        repetition_penalty=float(options.get("repetition_penalty", 1.0)),
        stop=tuple(options.get("stop") or ()),
        backend=str(options.get("backend") or "auto"),
    )


def serve(
    engine: InferenceEngine,
    build: Any,
    *,
    channel: Channel | None = None,
    stream_id: str | None = None,
    deltas: bool = True,
) -> dict[str, Any]:
    """Answer; with a stream, publish each delta (unless ``deltas`` is off: the API waits for
    the whole answer) and then ``done`` or ``error``.

    ``build`` makes the request (it may read the job store, so its errors are streamed too).
    Returns the answer dict, or ``{"error": ...}`` for the API to turn into the same problem.
    A request the API gave up on (its cancel flag) stops and publishes nothing more.
    """
    try:
        if channel is not None and stream_id is not None:
            channel.publish(stream_id, {"type": "accepted"})
        request: InferenceRequest = build()
        if channel is not None and stream_id is not None:
            request.should_stop = stop_flag(channel, stream_id)
            request.on_start = lambda: channel.publish(stream_id, {"type": "started"})
            if deltas:
                request.on_delta = lambda text: channel.publish(
                    stream_id, {"type": "delta", "text": text}
                )
        result = engine.submit(request).result()
        result["loads"] = dict(engine.loads)
    except InferenceCancelled as exc:
        log.info("inference %s stopped: %s", stream_id, exc.detail)
        if channel is not None and stream_id is not None:
            channel.forget(stream_id)
        return {"error": exc.as_dict()}
    except Exception as exc:
        error = (
            exc
            if isinstance(exc, MedtuneError)
            else InferenceFailed(f"inference failed on the worker: {type(exc).__name__}")
        )
        if not isinstance(exc, MedtuneError):
            log.exception("inference failed")
        if channel is not None and stream_id is not None:
            channel.publish(stream_id, {"type": "error", "error": error.as_dict()})
        return {"error": error.as_dict()}
    if channel is not None and stream_id is not None:
        channel.publish(stream_id, {"type": "done", "result": result})
    return result
