"""Per-key rate limits: an in-process token bucket.

Each (limit, key) pair has a bucket holding a minute's worth of requests: a client may burst up
to the per-minute limit, after which it gets one request per ``60 / limit`` seconds. The buckets
live in the API process (no database write per request), so the limits hold per process: run one
API process (as Dockerfile.api does) or divide the limits by the number of processes.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from core.errors import MedtuneError


class RateLimited(MedtuneError):
    """Too many requests from one key: 429 with Retry-After (whole seconds)."""

    code = "rate_limited"
    status = 429

    def __init__(self, detail: str, *, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s
        self.headers = {"Retry-After": str(retry_after_s)}


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Token buckets by (name, scope); thread-safe (sync routes run in a thread pool)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._lock = threading.Lock()

    def hit(self, name: str, scope: str, *, per_minute: int, what: str) -> None:
        """Take one token from the bucket, or raise RateLimited; ``per_minute`` 0 is no limit."""
        if per_minute <= 0:
            return
        rate = per_minute / 60.0  # tokens per second
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get((name, scope))
            if bucket is None:
                bucket = self._buckets[(name, scope)] = _Bucket(tokens=per_minute, stamp=now)
            bucket.tokens = min(float(per_minute), bucket.tokens + (now - bucket.stamp) * rate)
            bucket.stamp = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return
            wait = math.ceil((1.0 - bucket.tokens) / rate)
        raise RateLimited(
            f"too many {what}: this key may make {per_minute} per minute; retry in {wait} s",
            retry_after_s=max(wait, 1),
        )
