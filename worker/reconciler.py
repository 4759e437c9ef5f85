"""A worker-side loop that requeues jobs whose worker died (their lease lapsed).

Each worker process runs one; they agree through conditional UPDATEs, and a duplicate
delivery is harmless because a task first claims its job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from core.queue import RUN_JOB_TASK, TRAIN_QUEUE
from core.settings import Settings
from core.store import jobs
from core.store.db import session_scope

log = logging.getLogger(__name__)


def reconcile_once(app: Any, settings: Settings) -> list[str]:
    """Requeue jobs whose worker died, then send every queued job the broker may not hold."""
    with session_scope(settings.db_url) as s:
        lapsed = jobs.requeue_lapsed(s)
        for job_id in lapsed:
            log.warning("job %s lost its worker; requeued to resume from its checkpoint", job_id)
        pending = jobs.needs_enqueue(
            s,
            grace_s=settings.reconcile_interval_s,
            resend_after_s=settings.resend_queued_after_s,
        )
        sent = []
        for job in pending:
            app.send_task(RUN_JOB_TASK, args=[job.id], queue=job.queue or TRAIN_QUEUE)
            jobs.mark_enqueued(s, job.id)
            sent.append(job.id)
    return sent


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
