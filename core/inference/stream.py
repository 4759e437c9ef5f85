"""Token deltas from an inference worker to the API process that relays them as SSE.

The API sends the inference task with a fresh ``stream_id`` and reads that stream's events;
the worker appends an event per piece of text, then ``done`` (the answer's usage and
finish_reason) or ``error`` (a MedtuneError's dict). Events are kept in order and nothing is
lost if the worker writes before the API starts reading:

- Redis (production: the broker is Redis): a list per stream, ``RPUSH`` by the worker and
  ``BLPOP`` by the API, expiring after ``TTL_S`` so an abandoned stream leaves nothing behind.
- A file per stream under ``$MEDTUNE_HOME/streams`` (the embedded set-up: its broker is a SQLite
  file in the same folder, so API and worker share that folder by construction).

Two progress events say how far the request got, so that a timeout can say what happened:
``accepted`` (a worker took the task) and ``started`` (the model began on it). They are not
handed to the reader and do not restart its wait. When the reader stops before the last event
(the wait ran out, the client went away) it raises the stream's cancel flag, which the worker
checks every token: the generation stops instead of computing an answer nobody reads.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from core.errors import InferenceTimeout
from core.settings import Settings

TTL_S = 600
KEY_PREFIX = "medtune:infer-stream:"
CANCEL_PREFIX = "medtune:infer-cancel:"
POLL_S = 0.003  # the file channel's polling interval
BLPOP_SLICE_S = 1.0
PROGRESS = ("accepted", "started")
STOP_POLL_S = 0.1  # a generation looks at its cancel flag at most this often


def new_stream_id() -> str:
    return uuid.uuid4().hex


class Channel(Protocol):
    def publish(self, stream_id: str, event: dict[str, Any]) -> None: ...

    def events(self, stream_id: str, *, timeout_s: float) -> Iterator[dict[str, Any]]: ...

    def cancel(self, stream_id: str) -> None: ...

    def cancelled(self, stream_id: str) -> bool: ...

    def forget(self, stream_id: str) -> None: ...


def _timeout(timeout_s: float, reached: str | None) -> InferenceTimeout:
    """Worded by how far the request got (``reached``: the last progress or ``delta``)."""
    limit = f"{timeout_s:.0f} s (MEDTUNE_INFER_TIMEOUT_S)"
    if reached is None:
        detail = (
            f"no inference worker took the request in {limit}: is a worker consuming the "
            "medtune.infer queue? If one is, all of its threads are busy"
        )
    elif reached == "accepted":
        detail = (
            f"the inference worker was busy with earlier requests for {limit}; this one was "
            "dropped before it started: try again, or ask for fewer max_new_tokens"
        )
    elif reached == "started":
        detail = (
            f"the answer took longer than {limit} and was stopped: ask for fewer "
            "max_new_tokens, or stream it (stream: true)"
        )
    else:
        detail = f"the inference worker sent no more of the answer for {limit}; it was stopped"
    return InferenceTimeout(detail)


def _last(event: dict[str, Any]) -> bool:
    return event.get("type") in ("done", "error")


class _Reading:
    """What a reader saw of one stream: the wait's deadline and how far the request got."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.reached: str | None = None
        self.finished = False

    def take(self, event: dict[str, Any]) -> bool:
        """Note the event; True if the reader gets it (progress events stay here)."""
        kind = event.get("type")
        self.reached = "delta" if kind == "delta" else kind if kind in PROGRESS else self.reached
        if kind in PROGRESS:
            return False  # they do not restart the wait: it is for the answer's text
        self.deadline = time.monotonic() + self.timeout_s
        self.finished = _last(event)
        return True

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise _timeout(self.timeout_s, self.reached)


def stop_flag(channel: Channel, stream_id: str) -> Callable[[], bool]:
    """A check for every token that asks the channel at most every STOP_POLL_S; once set, set."""
    state = {"next": 0.0, "set": False}

    def stopped() -> bool:
        now = time.monotonic()
        if not state["set"] and now >= state["next"]:
            state["next"] = now + STOP_POLL_S
            state["set"] = channel.cancelled(stream_id)
        return bool(state["set"])

    return stopped


class RedisChannel:
    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)

    def publish(self, stream_id: str, event: dict[str, Any]) -> None:
        key = KEY_PREFIX + stream_id
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(key, json.dumps(event))
        pipe.expire(key, TTL_S)
        pipe.execute()

    def events(self, stream_id: str, *, timeout_s: float) -> Iterator[dict[str, Any]]:
        key = KEY_PREFIX + stream_id
        reading = _Reading(timeout_s)
        try:
            while True:
                # Short waits: redis-py's socket timeout would cut a long BLPOP.
                item = self.client.blpop([key], timeout=BLPOP_SLICE_S)
                if item is None:
                    reading.check()
                    continue
                event = json.loads(item[1])
                if reading.take(event):
                    yield event
                    if reading.finished:
                        return
                else:
                    reading.check()
        finally:
            if not reading.finished:
                self.cancel(stream_id)
            self.client.delete(key)

    def cancel(self, stream_id: str) -> None:
        self.client.set(CANCEL_PREFIX + stream_id, 1, ex=TTL_S)

    def cancelled(self, stream_id: str) -> bool:
        return bool(self.client.exists(CANCEL_PREFIX + stream_id))

    def forget(self, stream_id: str) -> None:
        """The worker is done with a cancelled stream: drop what the reader left for it."""
        self.client.delete(CANCEL_PREFIX + stream_id, KEY_PREFIX + stream_id)


class FileChannel:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, stream_id: str) -> Path:
        if not stream_id.isalnum():
            raise ValueError("a stream id is letters and digits")
        return self.folder / f"{stream_id}.jsonl"

    def _flag(self, stream_id: str) -> Path:
        return self._path(stream_id).with_suffix(".cancel")

    def publish(self, stream_id: str, event: dict[str, Any]) -> None:
        if self.cancelled(stream_id):  # nobody reads it: leave no file behind
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        # One write per line in append mode: a reader never sees half of a line it can parse.
        with self._path(stream_id).open("a") as fh:
            fh.write(json.dumps(event) + "\n")

    def events(self, stream_id: str, *, timeout_s: float) -> Iterator[dict[str, Any]]:
        path = self._path(stream_id)
        offset = 0
        buffer = ""
        reading = _Reading(timeout_s)
        try:
            while True:
                chunk = ""
                if path.exists():
                    with path.open() as fh:
                        fh.seek(offset)
                        chunk = fh.read()
                        offset = fh.tell()
                if not chunk:
                    reading.check()
                    time.sleep(POLL_S)
                    continue
                buffer += chunk
                *lines, buffer = buffer.split("\n")
                for line in lines:
                    event = json.loads(line)
                    if reading.take(event):
                        yield event
                        if reading.finished:
                            return
                reading.check()
        finally:
            if not reading.finished:
                self.cancel(stream_id)
            path.unlink(missing_ok=True)

    def cancel(self, stream_id: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._flag(stream_id).touch()

    def cancelled(self, stream_id: str) -> bool:
        return self._flag(stream_id).exists()

    def forget(self, stream_id: str) -> None:
        self._flag(stream_id).unlink(missing_ok=True)
        self._path(stream_id).unlink(missing_ok=True)


_redis_channels: dict[str, RedisChannel] = {}


def channel_for(settings: Settings) -> Channel:
    """Redis when the broker is Redis, else files in the state folder."""
    broker = settings.celery_broker_url
    if broker.startswith(("redis://", "rediss://")):
        if broker not in _redis_channels:  # one connection pool per process
            _redis_channels[broker] = RedisChannel(broker)
        return _redis_channels[broker]
    return FileChannel(settings.home / "streams")
