"""The worker's Celery app: ``celery -A worker.celery_app worker -Q medtune.train``."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_ready

from core.queue import make_celery
from core.settings import get_settings

app = make_celery(get_settings())
app.conf.include = ["worker.tasks"]


@worker_ready.connect
def _start_reconciler(sender: Any = None, **_: Any) -> None:
    from worker import reconciler

    reconciler.start(app, get_settings())
