"""The API's side of inference: send the task by name, then read the answer's stream.

No torch here: the API process only talks to the broker and the stream channel.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from typing import Any

from core.errors import MedtuneError
from core.inference_stream import Channel, new_stream_id
from core.queue import INFER_QUEUE, INFER_TASK


def stream_answer(
    queue: Any,
    channel: Channel,
    *,
    args: list[Any],
    kwargs: dict[str, Any],
    timeout_s: float,
) -> Iterator[dict[str, Any]]:
    """The worker's events (``delta``..., then ``done`` or ``error``).

    Waits for the first event before returning, so an error that comes before any text (no
    adapter, job not ready, no worker) is raised here and the API can still answer it as a
    problem+json instead of a stream that starts with 200.
    """
    stream_id = new_stream_id()
    pending = queue.send_task(
        INFER_TASK, args=args, kwargs={**kwargs, "stream_id": stream_id}, queue=INFER_QUEUE
    )
    events = channel.events(stream_id, timeout_s=timeout_s)
    try:
        first = next(events)
    except MedtuneError:
        pending.revoke()
        raise
    if first["type"] == "error":
        raise MedtuneError.from_dict(first["error"])
    return chain([first], events)
