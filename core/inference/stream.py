"""Token deltas from an inference worker to the API process that relays them as SSE.

The API sends the inference task with a fresh ``stream_id`` and reads that stream's events;
the worker appends an event per piece of text, then ``done`` (the answer's usage and
finish_reason) or ``error`` (a MedtuneError's dict). Events are kept in order and nothing is
lost if the worker writes before the API starts reading:

- Redis (production: the broker is Redis): a list per stream, ``RPUSH`` by the worker and
  ``BLPOP`` by the API, expiring after ``TTL_S`` so an abandoned stream leaves nothing behind.
- A file per stream under ``$MEDTUNE_HOME/streams`` (the embedded set-up: its broker is a SQLite
  file in the same folder, so API and worker share that folder by construction).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from core.errors import InferenceTimeout
from core.settings import Settings

TTL_S = 600
KEY_PREFIX = "medtune:infer-stream:"
POLL_S = 0.003  # the file channel's polling interval
BLPOP_SLICE_S = 1.0


def new_stream_id() -> str:
    return uuid.uuid4().hex


class Channel(Protocol):
    def publish(self, stream_id: str, event: dict[str, Any]) -> None: ...

    def events(self, stream_id: str, *, timeout_s: float) -> Iterator[dict[str, Any]]: ...


def _timeout(timeout_s: float) -> InferenceTimeout:
    return InferenceTimeout(
        f"the inference worker sent nothing for {timeout_s:.0f} s; is a worker consuming the "
        "medtune.infer queue?"
    )


def _last(event: dict[str, Any]) -> bool:
    return event.get("type") in ("done", "error")


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
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                # Short waits: redis-py's socket timeout would cut a long BLPOP.
                item = self.client.blpop([key], timeout=BLPOP_SLICE_S)
                if item is None:
                    if time.monotonic() > deadline:
                        raise _timeout(timeout_s)
                    continue
                deadline = time.monotonic() + timeout_s
                event = json.loads(item[1])
                yield event
                if _last(event):
                    return
        finally:
            self.client.delete(key)


class FileChannel:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, stream_id: str) -> Path:
        if not stream_id.isalnum():
            raise ValueError("a stream id is letters and digits")
        return self.folder / f"{stream_id}.jsonl"

    def publish(self, stream_id: str, event: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # One write per line in append mode: a reader never sees half of a line it can parse.
        with self._path(stream_id).open("a") as fh:
            fh.write(json.dumps(event) + "\n")

    def events(self, stream_id: str, *, timeout_s: float) -> Iterator[dict[str, Any]]:
        path = self._path(stream_id)
        offset = 0
        buffer = ""
        last_seen = time.monotonic()
        try:
            while True:
                chunk = ""
                if path.exists():
                    with path.open() as fh:
                        fh.seek(offset)
                        chunk = fh.read()
                        offset = fh.tell()
                if not chunk:
                    if time.monotonic() - last_seen > timeout_s:
                        raise _timeout(timeout_s)
                    time.sleep(POLL_S)
                    continue
                last_seen = time.monotonic()
                buffer += chunk
                *lines, buffer = buffer.split("\n")
                for line in lines:
                    event = json.loads(line)
                    yield event
                    if _last(event):
                        return
        finally:
            path.unlink(missing_ok=True)


_redis_channels: dict[str, RedisChannel] = {}


def channel_for(settings: Settings) -> Channel:
    """Redis when the broker is Redis, else files in the state folder."""
    broker = settings.celery_broker_url
    if broker.startswith(("redis://", "rediss://")):
        if broker not in _redis_channels:  # one connection pool per process
            _redis_channels[broker] = RedisChannel(broker)
        return _redis_channels[broker]
    return FileChannel(settings.home / "streams")
