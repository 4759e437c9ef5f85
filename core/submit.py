"""Submitting a job: the service logic behind POST /jobs and POST /v1/fine_tuning/jobs.

Checks what the server can check cheaply (base model, files, dataset paths, routing), stores
the job, then queues it. The store is the truth: a broker that is down loses nothing.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from sqlmodel import Session

from core import auth, routing, webhooks
from core.base_models import allowed_model_roots, check_base_model
from core.continuation import check_init_adapter
from core.data.preference_rows import check_rows
from core.data.sources import allowed_roots, resolve_local
from core.data.validation import resolve_validation
from core.embedded_model import is_embedded
from core.evaluation.job import benchmark_files
from core.lora_targets import check_target_modules
from core.queue import RUN_JOB_TASK, TRAIN_QUEUE
from core.ratelimit import RateLimiter
from core.settings import Settings
from core.spec import JobSpec
from core.store import files, idempotency, jobs
from core.store.models import Job
from core.training.engines import check_loftq
from core.training.tracking import check_report_to, distributed

log = logging.getLogger(__name__)


def submit_job(
    session: Session,
    settings: Settings,
    queue: Any,
    spec: JobSpec,
    *,
    principal: auth.Principal,
    limiter: RateLimiter,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Check, store and queue a job for ``principal``; returns (job, replayed).

    With ``idempotency_key``, a key already used with the same spec returns that job and queues
    nothing (replayed is True).
    """
    scope = principal.scope
    if idempotency_key is not None:
        earlier = idempotency.replay(session, scope=scope, key=idempotency_key, spec=spec)
        if earlier is not None:
            return earlier, True
    limiter.hit("jobs", scope, per_minute=settings.rate_jobs_per_minute, what="jobs created")
    # Fail now, not minutes later on a worker, for what the server can check cheaply.
    check_base_model(spec.model.base_model, roots=allowed_model_roots(settings))
    # Uploaded files the spec names must be the caller's; their rows stay share-locked until
    # the job is committed, so a concurrent DELETE sees the job and refuses (file_in_use).
    files.check_spec_files(session, spec.to_json(), owner=principal.job_owner)
    roots = allowed_roots(settings)
    # A dpo / orpo job's file must hold preference pairs (its first row is read).
    check_rows(spec, resolve_local(spec.dataset, roots=roots, uploads=settings.uploads_dir))
    held_out = resolve_validation(spec, roots=roots, uploads=settings.uploads_dir)
    check_rows(spec, held_out, validation=True)
    benchmark_files(spec, settings)
    check_init_adapter(session, spec, owner=principal.job_owner)
    # The package check only where this process has the training stack (`medtune up`): the
    # API image has none, and the worker notes a tracker it cannot load.
    check_report_to(spec, environ=os.environ, check_packages=distributed("torch"))
    if spec.webhook is not None:
        webhooks.check_target(spec.webhook.url, allow_private=settings.webhook_allow_private)
    local_dir = routing.config_dir(spec.model.base_model, settings.models_dir)
    embedded = is_embedded(spec.model.base_model)
    check_target_modules(
        spec.lora.target_modules, local_dir, model_type="llama" if embedded else None
    )
    target, needed = routing.route(spec, routing.live_workers(session), local_dir=local_dir)
    # A job routed to the CPU queue runs on a CPU worker: refuse what only CUDA can do now.
    check_loftq(spec, cuda=target != TRAIN_QUEUE)
    options: dict[str, Any] = {
        "queue": target,
        "estimated_gpu_memory_gib": round(needed.total_gib, 2) if needed else None,
        "owner_key_id": principal.key_id,
    }
    if idempotency_key is None:
        job = jobs.create_job(session, spec, **options)
    else:
        job, replayed = idempotency.create_job_once(
            session, spec, scope=scope, key=idempotency_key, **options
        )
        if replayed:  # a concurrent request with the same key won
            return job, True
    # Commit first, enqueue the id second: the task re-reads the row (the store is the truth).
    # A broker that is down loses nothing: the job stays queued, unstamped, and the workers'
    # reconciler sends it.
    try:
        queue.send_task(RUN_JOB_TASK, args=[job.id], queue=target)
    except Exception:
        log.exception("job %s stored but not sent to the broker; the reconciler will", job.id)
    else:
        jobs.mark_enqueued(session, job.id)
        session.refresh(job)
    return job, False
