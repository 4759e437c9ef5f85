"""What a trainer reports to, so training code knows nothing of databases or queues.

A trainer calls ``log`` for every logging step and ``flush`` before it writes a checkpoint and
when it stops (finished, cancelled or failed): a checkpoint is never ahead of the stored
metrics, so a run resumed from it neither loses nor repeats a step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

Values = dict[str, float | None]
log = logging.getLogger(__name__)


class MetricsSink(Protocol):
    def begin(self, total_steps: int) -> None:
        """Called once the trainer knows how many optimizer steps it will run."""

    def log(self, step: int, values: Values) -> None:
        """One logging step's metrics; a second call for the same step adds to that row."""

    def flush(self) -> None:
        """Write out whatever is buffered (before a checkpoint, and when training stops)."""

    def should_stop(self) -> bool:
        """Polled at step boundaries: True when the job was cancelled."""


def merge(into: Values, values: Values) -> None:
    """Fill a step's row with new values; a value already there wins over a None."""
    for key, value in values.items():
        if value is not None or key not in into:
            into[key] = value


class ListSink:
    """Keeps metrics in memory: for tests, benchmarks and the bare CLI."""

    def __init__(self) -> None:
        self.total_steps = 0
        self.rows: list[Values] = []
        self.flushes = 0
        self.stop = False

    def begin(self, total_steps: int) -> None:
        self.total_steps = total_steps

    def log(self, step: int, values: Values) -> None:
        if self.rows and self.rows[-1]["step"] == step:
            merge(self.rows[-1], values)
        else:
            self.rows.append({"step": step, **values})

    def flush(self) -> None:
        self.flushes += 1

    def should_stop(self) -> bool:
        return self.stop


class BufferedSink:
    """Batches rows for a writer whose every call costs a round trip (a database, a file).

    Rows of the same step are merged, and each carries ``created_at``, the time its step was
    logged (step times are read off these stamps, not off the batch write). Every
    ``max_rows`` rows or ``max_seconds`` after the last hand-off (checked when a row arrives)
    the batch goes to a writer thread, so the training loop pays for a dict update, not for
    the write. ``flush`` hands off what is left and waits until everything is written; a
    failed write keeps its rows for the next attempt and is raised by ``flush``, so a
    checkpoint is never written ahead of rows that did not reach the store.

    Subclasses implement ``write_rows`` (and usually ``begin`` and ``should_stop``).
    """

    def __init__(
        self,
        *,
        max_rows: int = 64,
        max_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
    ) -> None:
        self.max_rows, self.max_seconds, self.clock = max_rows, max_seconds, clock
        self.buffer: dict[int, dict[str, Any]] = {}
        self.last_write = clock()
        self._background = background
        self._batches: queue.Queue[list[dict[str, Any]] | None] = queue.Queue()
        self._unwritten: list[dict[str, Any]] = []  # rows of failed writes, retried first
        self._error: BaseException | None = None
        self._writer: threading.Thread | None = None

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def begin(self, total_steps: int) -> None:
        return None

    def should_stop(self) -> bool:
        return False

    def log(self, step: int, values: Values) -> None:
        row = self.buffer.get(step)
        if row is None:
            row = self.buffer[step] = {"step": step, "created_at": datetime.now(UTC)}
        merge(row, values)
        if len(self.buffer) >= self.max_rows or self.clock() - self.last_write >= self.max_seconds:
            self._hand_off()

    def flush(self) -> None:
        self._hand_off(retry=True)
        if self._background:
            self._batches.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Write what is left and stop the writer thread; a failed write is logged, not raised
        (``flush`` already reported it to the trainer)."""
        try:
            self.flush()
        except Exception:
            log.warning("metric rows not written: %d", len(self._unwritten), exc_info=True)
        if self._writer is not None:
            self._batches.put(None)
            self._writer.join(timeout=30)
            self._writer = None

    def _hand_off(self, *, retry: bool = False) -> None:
        self.last_write = self.clock()
        if not self.buffer and not (retry and self._unwritten):
            return
        rows = [self.buffer[step] for step in sorted(self.buffer)]
        self.buffer = {}
        if not self._background:
            self._write(rows)
            return
        if self._writer is None:
            self._writer = threading.Thread(target=self._run, name="metrics-writer", daemon=True)
            self._writer.start()
        self._batches.put(rows)

    def _run(self) -> None:
        while True:
            rows = self._batches.get()
            try:
                if rows is None:
                    return
                self._write(rows)
            finally:
                self._batches.task_done()

    def _write(self, rows: list[dict[str, Any]]) -> None:
        pending = self._unwritten + rows
        if not pending:
            return
        try:
            self.write_rows(pending)
        except Exception as exc:
            self._unwritten, self._error = pending, exc
        else:
            self._unwritten = []


class TeeSink:
    """Sends every call to several sinks; the job stops when any of them says so."""

    def __init__(self, *sinks: MetricsSink) -> None:
        self.sinks = sinks

    def begin(self, total_steps: int) -> None:
        for sink in self.sinks:
            sink.begin(total_steps)

    def log(self, step: int, values: Values) -> None:
        for sink in self.sinks:
            sink.log(step, values)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def should_stop(self) -> bool:
        return any(sink.should_stop() for sink in self.sinks)

    def close(self) -> None:
        """Release what the sinks hold open (event files)."""
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()
