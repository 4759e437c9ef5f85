"""The worker's webhook delivery loop: every MEDTUNE_WEBHOOK_POLL_S, attempt the due deliveries
of finished jobs (core.webhooks). Every worker runs one; a claim makes each attempt one
worker's."""

from __future__ import annotations

import logging
import threading

from core import webhooks
from core.settings import Settings
from core.store.db import session_scope

log = logging.getLogger(__name__)


def start(settings: Settings) -> threading.Event:
    """Deliver until the event is set."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(settings.webhook_poll_s):
            try:
                with session_scope(settings.db_url) as s:
                    webhooks.deliver_due(s, settings)
            except Exception:  # the database may be restarting: try again next round
                log.exception("webhook delivery failed")

    threading.Thread(target=loop, name="medtune-webhooks", daemon=True).start()
    return stop
