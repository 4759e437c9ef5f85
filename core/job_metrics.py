"""Where a job's training metrics go: the job store (in batches), TensorBoard event files, and
the experiment trackers the job reports to (MLflow, W&B)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.settings import Settings
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.training.sink import BufferedSink, MetricsSink, TeeSink
from core.training.tensorboard import TENSORBOARD_DIR, TensorBoardSink
from core.training.tracking import JobTracking


class DatabaseSink(BufferedSink):
    """Writes logging steps to the job store in batches and reads cancel requests from it.

    A round trip per step would cost a fast GPU step several percent (BENCHMARKS.md), so rows
    are batched and written by a writer thread, and the cancel flag is read at most every
    ``cancel_poll_s`` seconds.
    """

    def __init__(
        self,
        url: str,
        job_id: str,
        *,
        max_rows: int = 64,
        max_seconds: float = 2.0,
        cancel_poll_s: float = 1.0,
        background: bool = True,
        lease_check: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(max_rows=max_rows, max_seconds=max_seconds, background=background)
        self.url, self.job_id, self.cancel_poll_s = url, job_id, cancel_poll_s
        # Raises LeaseLost once another worker may hold the job: its rows must not mix with ours.
        self.lease_check = lease_check or (lambda: None)
        self._cancel_read_at = -math.inf
        self._cancelled = False

    def begin(self, total_steps: int) -> None:
        with session_scope(self.url) as s:
            jobs.set_fields(s, self.job_id, steps_total=total_steps)

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        self.lease_check()
        with session_scope(self.url) as s:
            jobs.add_metrics(s, self.job_id, rows)

    def should_stop(self) -> bool:
        self.lease_check()  # stops the run at the next step, without a checkpoint
        now = time.monotonic()
        if not self._cancelled and now - self._cancel_read_at >= self.cancel_poll_s:
            self._cancel_read_at = now
            with session_scope(self.url) as s:
                self._cancelled = jobs.cancel_requested(s, self.job_id)
        return self._cancelled


def job_sink(
    url: str,
    job_id: str,
    *,
    job_dir: Path,
    resume_step: int,
    lease_check: Callable[[], None] | None = None,
    tracking: JobTracking | None = None,
) -> TeeSink:
    """The sink a job's training run reports to; ``close()`` it when the run ends.

    ``resume_step``: the checkpoint step the run starts from (0 for a fresh start); TensorBoard
    drops what an earlier, lost run logged after it. ``tracking``: the job's tracker runs, each
    of which gets every row too.
    """
    sinks: list[MetricsSink] = [DatabaseSink(url, job_id, lease_check=lease_check)]
    if tracking is None or tracking.tensorboard:
        sinks.append(TensorBoardSink(job_dir / TENSORBOARD_DIR, resume_step=resume_step))
    if tracking is not None:
        sinks += tracking.sinks()
    return TeeSink(*sinks)


def start_tracking(settings: Settings, job_id: str, spec: JobSpec, job_dir: Path) -> JobTracking:
    """Open the job's tracker runs (the ones its row names, for a resumed job) and store where
    they are on the job row; a tracker that cannot start is a note, not an error."""
    url = settings.db_url
    with session_scope(url) as s:
        previous = jobs.get_job(s, job_id).tracking
    tracking = JobTracking.start(
        spec,
        job_id=job_id,
        job_dir=job_dir,
        home=settings.home,
        mlflow_uri=settings.mlflow_tracking_uri,
        previous=previous,
        environ=os.environ,
    )
    # A resumed attempt whose tracker cannot start keeps where the earlier attempt's run is.
    location = {**(previous or {}), **(tracking.location() or {})} or None
    with session_scope(url) as s:
        jobs.set_fields(s, job_id, tracking=location)
        for note in tracking.take_notes():
            jobs.add_note(s, job_id, note)
    return tracking


def end_tracking(url: str, job_id: str, tracking: JobTracking, status: str) -> None:
    """Close the runs with the job's status (succeeded, failed, cancelled); note any failure."""
    tracking.end(status)
    notes = tracking.take_notes()
    if notes:
        with session_scope(url) as s:
            for note in notes:
                jobs.add_note(s, job_id, note)
