"""The worker's Celery app: ``celery -A worker.celery_app worker -Q medtune.train``."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_init, worker_ready

from core.queue import TRAIN_QUEUE, make_celery
from core.settings import get_settings
from core.store.db import connect_retry

app = make_celery(get_settings())
app.conf.include = ["worker.tasks"]
log = logging.getLogger(__name__)


@worker_init.connect
def _wait_for_the_database(**_: Any) -> None:
    """A database restart pauses this worker's writes (metric rows, lease, status) until it is
    back. Set when a worker starts, not on import: a process that only imports the tasks (the
    tests, a script) keeps failing fast."""
    connect_retry(get_settings().db_retry_s)


def consumed_queues(celery: Any = None) -> set[str]:
    """The queues this worker consumes: its -Q, as Celery selected them when it started (every
    declared queue, the training one included, when no -Q was given or outside a worker)."""
    return set((celery or app).amqp.queues.consume_from)


def _gpu() -> tuple[str, float] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)  # one worker process per GPU
    return props.name, props.total_memory / 2**30


def preload_unsloth() -> bool:
    """On a CUDA worker with Unsloth installed, import it now (about 20 s on the GPU machine),
    before the worker takes its first job: a fresh worker's first job (or first warm-up of an
    inference base) then does not pay for it (issue 13). False where it does not apply."""
    import importlib.util

    if importlib.util.find_spec("unsloth") is None or _gpu() is None:
        return False
    import unsloth  # noqa: F401  (patches transformers, as a job's load would)

    log.info("Unsloth imported at worker start")
    return True


@worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    """Train workers join their GPU's memory-class queue and announce it; all reconcile."""
    from core.routing import announce, gpu_queue
    from core.store.db import session_scope
    from worker import reconciler, retention, webhooks

    settings = get_settings()
    preload_unsloth()
    consumed = {q.name for q in sender.task_consumer.queues} if sender else set()
    heartbeat = None
    if TRAIN_QUEUE in consumed:
        gpu = _gpu()
        queue = gpu_queue(gpu[1]) if gpu else TRAIN_QUEUE
        if gpu:
            sender.add_task_queue(queue)
        name = sender.hostname

        def heartbeat() -> None:
            with session_scope(settings.db_url) as s:
                announce(
                    s,
                    name=name,
                    queue=queue,
                    gpu_name=gpu[0] if gpu else None,
                    gpu_memory_gib=gpu[1] if gpu else None,
                )

        heartbeat()
        log.info("worker %s consumes %s", name, queue)
        reconciler.reclaim(app, settings, name)
    reconciler.start(app, settings, heartbeat=heartbeat)
    retention.start(settings)
    webhooks.start(settings)
