"""Celery configuration shared by the API (which only sends tasks by name) and the workers."""

from __future__ import annotations

from typing import Any

from core.settings import Settings

TRAIN_QUEUE = "medtune.train"
INFER_QUEUE = "medtune.infer"
RUN_JOB_TASK = "medtune.run_job"
INFER_TASK = "medtune.infer"

# A training job can run for hours: the broker must not hand it to another worker meanwhile.
VISIBILITY_TIMEOUT_S = 24 * 3600


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
        "task_routes": {RUN_JOB_TASK: {"queue": TRAIN_QUEUE}, INFER_TASK: {"queue": INFER_QUEUE}},
        "broker_transport_options": _transport_options(settings.celery_broker_url),
        "result_expires": 3600,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
    }


def _transport_options(broker_url: str) -> dict[str, Any]:
    if broker_url.startswith(("redis://", "rediss://")):
        return {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    # Kombu's SQL transport hands every option to create_engine(), so it gets none.
    return {}


def make_celery(settings: Settings, name: str = "medtune") -> Any:
    from celery import Celery

    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app
