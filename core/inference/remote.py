"""The API's side of inference: send the task by name, then read the answer off its stream.

No torch here: the API process only talks to the broker and the stream channel. Both calls send
the task with ``ignore_result``: the answer comes back on the stream channel (one Redis list
read with ``BLPOP``, or a file polled every few milliseconds), not through Celery's result
backend, which costs a subscribe, a read and an unsubscribe per task on Redis and polls every
half second on the embedded database.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from itertools import chain
from typing import Any

from core.errors import InferenceTimeout, MedtuneError
from core.inference.stream import Channel, new_stream_id
from core.queue import INFER_QUEUE, INFER_TASK
from core.spec import JobSpec
from core.store.models import Job


def job_target(job: Job, spec: JobSpec | None = None) -> dict[str, Any]:
    """What the worker needs from a job row to answer with it (plain values, JSON-safe).

    The API has just read the job to check its owner and status, so it sends this with the task
    and the worker answers without a job-store query per request (``spec``: the job's, parsed).
    """
    spec = spec if spec is not None else JobSpec.model_validate(job.spec)
    return {
        "base_model": job.base_model,
        "status": str(job.status),
        "adapter_dir": job.adapter_dir,
        "artifacts_dir": job.artifacts_dir,
        "load_in_4bit": spec.model.load_in_4bit,
    }


# Options shown in the task's headers (monitoring, worker logs); the rest may hold user text.
_SHOWN = ("use_adapter", "max_new_tokens", "backend", "deltas", "stream_id")


def _send(queue: Any, args: list[Any], kwargs: dict[str, Any]) -> tuple[str, Any]:
    stream_id = new_stream_id()
    kwargs = {**kwargs, "stream_id": stream_id}
    pending = queue.send_task(
        INFER_TASK,
        args=args,
        kwargs=kwargs,
        queue=INFER_QUEUE,
        ignore_result=True,
        # Celery would copy a repr of the messages (a patient's question) into the headers, and
        # computing that repr costs more than the rest of the send.
        argsrepr=repr((args[0], f"<{len(args[1])} messages>")),
        kwargsrepr=repr({key: kwargs[key] for key in _SHOWN if key in kwargs}),
    )
    return stream_id, pending


def ask(
    queue: Any,
    channel: Channel,
    *,
    args: list[Any],
    kwargs: dict[str, Any],
    timeout_s: float,
) -> dict[str, Any]:
    """The worker's whole answer; a domain error it reported is raised here with its status."""
    stream_id, pending = _send(queue, args, {**kwargs, "deltas": False})
    # Deltas are skipped: a worker from before ``deltas`` existed sends them anyway.
    with closing(channel.events(stream_id, timeout_s=timeout_s)) as events:
        try:
            last = next(event for event in events if event["type"] != "delta")
        except InferenceTimeout:
            pending.revoke()
            raise
    if last["type"] == "error":
        raise MedtuneError.from_dict(last["error"])
    result: dict[str, Any] = last["result"]
    return result


class AnswerStream:
    """The worker's events (``delta``..., then ``done`` or ``error``), and a way to stop it."""

    def __init__(self, channel: Channel, stream_id: str, events: Iterator[dict[str, Any]]):
        self.channel, self.stream_id, self.events = channel, stream_id, events

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.events

    def cancel(self) -> None:
        """The client left: the worker stops generating at its next token."""
        self.channel.cancel(self.stream_id)


def stream_answer(
    queue: Any,
    channel: Channel,
    *,
    args: list[Any],
    kwargs: dict[str, Any],
    timeout_s: float,
) -> AnswerStream:
    """The worker's events (``delta``..., then ``done`` or ``error``).

    Waits for the first event before returning, so an error that comes before any text (no
    adapter, job not ready, no worker) is raised here and the API can still answer it as a
    problem+json instead of a stream that starts with 200.
    """
    stream_id, pending = _send(queue, args, kwargs)
    events = channel.events(stream_id, timeout_s=timeout_s)
    try:
        first = next(events)
    except MedtuneError:
        pending.revoke()
        raise
    if first["type"] == "error":
        raise MedtuneError.from_dict(first["error"])
    return AnswerStream(channel, stream_id, chain([first], events))
