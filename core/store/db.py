"""Engine and session helpers for SQLite (embedded) and Postgres (production)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, create_engine

log = logging.getLogger(__name__)

# How long a new database connection is retried before the error is raised. The API keeps 0:
# it answers 503 at once while the database is down. Workers set it (connect_retry) so that a
# database restart pauses their writes (metric rows, lease, status) instead of failing the job.
_connect_retry_s = 0.0


def connect_retry(seconds: float) -> None:
    """Retry failed connects of every Postgres engine in this process for up to ``seconds``."""
    global _connect_retry_s
    _connect_retry_s = seconds


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            **_pool(parsed.database),
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pool_pre_ping: the API must survive a database restart without serving dead connections.
    engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=40)
    event.listen(engine, "do_connect", _connect_with_retry)
    return engine


def _pool(database: str | None) -> dict[str, Any]:
    """A file database gets the same pool as Postgres (above the API's admission limit)."""
    if not database or database == ":memory:":
        return {}
    return {"pool_size": 10, "max_overflow": 40}


def _connect_with_retry(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
    """Connect, retrying with backoff (0.25 s doubling to 5 s) within ``_connect_retry_s``.

    Every session checks its connection out (and pings it) first, so a write that comes while
    the database is down waits here for it to come back.
    """
    deadline = time.monotonic() + _connect_retry_s
    pause = 0.25
    while True:
        try:
            return dialect.connect(*cargs, **cparams)
        except dialect.loaded_dbapi.OperationalError as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("database unreachable (%s); retrying in %.2f s", str(exc).strip(), pause)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the API read while a worker writes metrics; busy_timeout waits instead of failing.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    with Session(get_engine(url), expire_on_commit=False) as session:
        yield session
