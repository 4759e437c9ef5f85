"""Structured logs: one JSON object per line, each carrying the id of the job being worked on.

``MEDTUNE_LOG_FORMAT=json`` switches the API (uvicorn's loggers included) and the Celery worker
to :class:`JsonFormatter`; anything else keeps their usual text lines. The worker sets the job id
with :func:`job_context` around a job, so every line logged while the job runs, by medtune or by
a library (transformers, peft, celery), can be filtered by ``job_id``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

LOG_FORMAT_ENV = "MEDTUNE_LOG_FORMAT"

job_id_var: ContextVar[str | None] = ContextVar("medtune_job_id", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is kept.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "job_id",
}
# Loggers that uvicorn and celery give handlers of their own (they do not all propagate to root).
_SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task")


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Tag every log line in this block (and in tasks it starts) with ``job_id``."""
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "job_id", ...extra, "exc_info"?}`` on one line.

    ``job_id`` is always present (null outside a job) so a log query can rely on the key; an
    explicit ``extra={"job_id": ...}`` wins over the context.
    """

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, tz=UTC)
        body: dict[str, Any] = {
            "ts": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", None) or job_id_var.get(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                body[key] = value
        if record.exc_info:
            body["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            body["stack_info"] = self.formatStack(record.stack_info)
        # default=str: a stray non-JSON extra (a Path, an exception) must not lose the line.
        return json.dumps(body, default=str, ensure_ascii=False)


def json_logs_enabled() -> bool:
    return os.environ.get(LOG_FORMAT_ENV, "").strip().lower() == "json"


def use_json_formatter(level: int | str | None = None) -> None:
    """Give every handler of the root, uvicorn and celery loggers the JSON formatter.

    Root gets a stderr handler if it has none. Safe to call more than once.
    """
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    if level is not None:
        root.setLevel(level)
    formatter = JsonFormatter()
    for name in ("", *_SERVER_LOGGERS):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(formatter)


def configure_from_env() -> bool:
    """Switch to JSON lines if ``MEDTUNE_LOG_FORMAT=json``; report whether it did."""
    if not json_logs_enabled():
        return False
    use_json_formatter()
    return True


def celery_setup_logging(
    *, loglevel: int | str | None = None, logfile: str | None = None, **_: Any
) -> None:
    """Receiver for Celery's ``setup_logging`` signal: root logs JSON lines to stderr or logfile.

    Connected only when JSON logs are on: a connected receiver stops Celery from setting up its
    own handlers, so the text default is left entirely to Celery.
    """
    root = logging.getLogger()
    root.handlers = []
    handler = logging.FileHandler(logfile) if logfile else logging.StreamHandler(sys.stderr)
    root.addHandler(handler)
    use_json_formatter(level=loglevel or logging.INFO)


def install_celery_logging() -> bool:
    """Make a Celery worker log JSON lines when ``MEDTUNE_LOG_FORMAT=json``.

    Must run before the worker sets up logging: importing the task modules does (Celery imports
    ``include`` modules before its logging set-up).
    """
    if not json_logs_enabled():
        return False
    from celery.signals import setup_logging

    setup_logging.connect(celery_setup_logging, weak=False)
    return True
