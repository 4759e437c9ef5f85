"""A worker-side loop that requeues jobs whose worker died (their lease lapsed).

Each worker process runs one; they agree through conditional UPDATEs, and a duplicate
delivery is harmless because a task first claims its job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from core import jobs
from core.db import session_scope
from core.queue import RUN_JOB_TASK, TRAIN_QUEUE
from core.settings import Settings

log = logging.getLogger(__name__)


def reconcile_once(app: Any, settings: Settings) -> list[str]:
    with session_scope(settings.db_url) as s:
        requeued = [(job_id, jobs.get_job(s, job_id).queue) for job_id in jobs.requeue_lapsed(s)]
    for job_id, queue in requeued:
        app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue or TRAIN_QUEUE)
        log.warning("job %s lost its worker; requeued to resume from its last checkpoint", job_id)
    return [job_id for job_id, _ in requeued]


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
