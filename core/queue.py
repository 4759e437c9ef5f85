"""Celery configuration shared by the API (which only sends tasks by name) and the workers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from core.settings import Settings

TRAIN_QUEUE = "medtune.train"
INFER_QUEUE = "medtune.infer"
# Every task name the service sends or serves, in one place: the API sends tasks by name only.
RUN_JOB_TASK = "medtune.run_job"
INFER_TASK = "medtune.infer"
EXPORT_TASK = "medtune.export"
PREVIEW_TASK = "medtune.preview"  # renders a dataset's first examples (needs a tokenizer)
# Sent by a training worker when a job starts training (load its base) and when its adapter is
# saved (attach it, build the fast path): the first answer then finds everything loaded.
WARM_TASK = "medtune.warm_base"
# Sent by a training worker once a job has ended (its memory handed back) or a later export has:
# the inference worker drops the job's reservation and retries the fast builds it refused.
FREED_TASK = "medtune.memory_freed"


def serves_only_inference(queues: Iterable[str]) -> bool:
    """A worker whose queues are the inference queue alone: nothing heavy shares its CPUs."""
    return set(queues) == {INFER_QUEUE}


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.celery_broker_url,
        "result_backend": settings.celery_result_backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": TRAIN_QUEUE,
        "task_routes": {
            RUN_JOB_TASK: {"queue": TRAIN_QUEUE},
            INFER_TASK: {"queue": INFER_QUEUE},
            WARM_TASK: {"queue": INFER_QUEUE},
            FREED_TASK: {"queue": INFER_QUEUE},
        },
        "broker_transport_options": _transport_options(
            settings.celery_broker_url, visibility_timeout_s=settings.visibility_timeout_s
        ),
        "result_expires": 3600,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
    }


def _transport_options(broker_url: str, *, visibility_timeout_s: float) -> dict[str, Any]:
    if broker_url.startswith(("redis://", "rediss://")):
        # A training job can run for hours: the default (a day) keeps the broker from handing
        # it to another worker meanwhile; if it does, the job's claim refuses the copy.
        options: dict[str, Any] = {"visibility_timeout": visibility_timeout_s}
        if visibility_timeout_s < 100:
            # Kombu sweeps for overdue tasks about every 100 s (10 s x a throttle of 10): a
            # short timeout only takes effect with sweeps as frequent.
            interval = max(1, int(visibility_timeout_s))
            options |= {"unacked_restore_interval": interval, "unacked_restore_throttle": 1}
        return options
    # Kombu's SQL transport hands every option to create_engine(), so it gets none.
    return {}


def make_celery(settings: Settings, name: str = "medtune") -> Any:
    from celery import Celery

    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app
