"""The worker's retention sweep (MEDTUNE_RETENTION_DAYS): a thread, since `medtune up` runs no
Celery beat. Every worker sweeps; two sweeping at once agree, since each removal is checked
against the store as it is made."""

from __future__ import annotations

import logging
import threading

from core import retention
from core.settings import Settings
from core.store.db import session_scope

log = logging.getLogger(__name__)


def sweep_once(settings: Settings) -> retention.Plan | None:
    """One sweep; None when retention is off (MEDTUNE_RETENTION_DAYS 0)."""
    if not settings.retention_days:
        return None
    with session_scope(settings.db_url) as s:
        return retention.sweep(s, settings, days=settings.retention_days)


def start(settings: Settings) -> threading.Event | None:
    """Sweep now and every retention_interval_s; None when retention is off. Set to stop."""
    if not settings.retention_days:
        return None
    stop = threading.Event()

    def loop() -> None:
        while True:
            try:
                sweep_once(settings)
            except Exception:  # the database may be restarting: try again next round
                log.exception("retention sweep failed")
            if stop.wait(settings.retention_interval_s):
                return

    threading.Thread(target=loop, name="medtune-retention", daemon=True).start()
    return stop
