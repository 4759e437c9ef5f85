"""A worker-side loop that requeues jobs whose worker died (their lease lapsed).

Each worker process runs one; they agree through conditional UPDATEs, and a duplicate
delivery is harmless because a task first claims its job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from core.queue import RUN_JOB_TASK, TRAIN_QUEUE
from core.settings import Settings
from core.store import jobs
from core.store.db import session_scope
from core.store.models import utcnow

log = logging.getLogger(__name__)


# A worker whose heartbeat is this many intervals old is dead: its jobs are requeued without
# waiting out their lease (one missed beat may be a slow database, three are not).
DEAD_AFTER_BEATS = 3


def _send(app: Any, session: Any, job_ids: list[str]) -> None:
    for job_id in job_ids:
        job = jobs.get_job(session, job_id)
        app.send_task(RUN_JOB_TASK, args=[job.id], queue=job.queue or TRAIN_QUEUE)
        jobs.mark_enqueued(session, job.id)


def reconcile_once(app: Any, settings: Settings) -> list[str]:
    """Requeue jobs whose worker died, then send them and every queued job the broker may not
    hold."""
    dead_before = utcnow() - timedelta(seconds=DEAD_AFTER_BEATS * settings.reconcile_interval_s)
    with session_scope(settings.db_url) as s:
        lapsed = jobs.requeue_lapsed(s, workers_dead_before=dead_before)
        for job_id in lapsed:
            log.warning("job %s lost its worker; requeued to resume from its checkpoint", job_id)
        pending = jobs.needs_enqueue(
            s,
            grace_s=settings.reconcile_interval_s,
            resend_after_s=settings.resend_queued_after_s,
        )
        # A requeued job is sent now, however recently it was created (the grace is for the
        # API's own send of a new job).
        sent = [*lapsed, *(job.id for job in pending if job.id not in lapsed)]
        _send(app, s, sent)
    return sent


def reclaim(app: Any, settings: Settings, worker: str) -> list[str]:
    """At start: requeue the jobs this worker's name held when its last process died, and send
    them now, so the restarted worker resumes them at once instead of after their lease."""
    with session_scope(settings.db_url) as s:
        mine = jobs.requeue_held_by(s, worker)
        for job_id in mine:
            log.warning("job %s was held by this worker's last process; resuming it", job_id)
        _send(app, s, mine)
    return mine


def start(
    app: Any, settings: Settings, *, heartbeat: Callable[[], None] | None = None
) -> threading.Event:
    """Every reconcile_interval_s: announce this worker, then reconcile. Set the event to stop."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(settings.reconcile_interval_s):
            try:
                if heartbeat:
                    heartbeat()
                reconcile_once(app, settings)
            except Exception:  # the database may be restarting: try again next round
                log.exception("reconcile failed")

    threading.Thread(target=loop, name="medtune-reconciler", daemon=True).start()
    return stop
