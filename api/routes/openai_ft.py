"""/v1/fine_tuning: OpenAI's fine-tuning endpoints over medtune's own jobs.

A job created here is an ordinary medtune job (listed by /jobs too) and the other way round.
Errors stay application/problem+json: OpenAI's SDKs raise their status error with this JSON body
(its ``detail`` and ``code`` say what went wrong) rather than an ``{"error": ...}`` object.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlmodel import Session

from api.deps import (
    IdempotencyKeyHeader,
    LimiterDep,
    PrincipalDep,
    QueueDep,
    SessionDep,
    SettingsDep,
)
from api.problems import field_path
from api.schemas import (
    FineTuningCheckpoint,
    FineTuningCheckpointsPage,
    FineTuningEventsPage,
    FineTuningJob,
    FineTuningJobCreate,
    FineTuningJobEvent,
    FineTuningJobsPage,
)
from core import openai_shapes as shapes
from core.errors import MedtuneError
from core.spec import JobSpec
from core.store import idempotency, jobs
from core.store.models import Job, JobStatus, MetricRow
from core.submit import submit_job
from core.training import checkpoints

router = APIRouter(prefix="/v1/fine_tuning", tags=["openai-compatible"])

Limit = Annotated[int, Query(ge=1, le=100)]
After = Annotated[str | None, Query(max_length=200)]


def _rows_before(session: Session, job: Job, *, before: int | None, count: int) -> list[MetricRow]:
    """The ``count`` newest metric rows with a step below ``before`` (None: any), newest first."""
    top = job.steps_done + 1 if before is None else before
    if top <= 1 or count <= 0:
        return []
    stride = int(job.spec.get("training_config", {}).get("logging_steps", 1))
    span = count * max(stride, 1)
    while True:
        low = max(top - 1 - span, -1)
        # Steps are unique per job, so (low, top) holds at most top - 1 - low rows.
        rows, _ = jobs.metrics_page(session, job.id, after_step=low, limit=top - 1 - low)
        older = [r for r in rows if r.step < top]
        if len(older) >= count or low == -1:
            return older[::-1][:count]
        span *= 4


def _job(session: Session, job: Job) -> FineTuningJob:
    running = job.status == JobStatus.running
    recent = _rows_before(session, job, before=None, count=20) if running else []
    return FineTuningJob.model_validate(shapes.job_object(job, recent))


def _method(body: FineTuningJobCreate) -> dict[str, Any] | None:
    """OpenAI's method as core.openai_shapes takes it: its type and hyperparameters."""
    if body.method is None:
        return None
    return {"type": body.method.type, "hyperparameters": body.method.hyperparameters()}


@contextmanager
def _as_request_fields(body: FineTuningJobCreate) -> Iterator[None]:
    """Errors about the spec name the OpenAI body field the client sent, not the spec field."""
    hp = body.hyperparameters.model_dump()
    method = _method(body)

    def request_field(spec_field: str) -> str:
        return shapes.request_field(
            spec_field, hyperparameters=hp, validation_file=body.validation_file, method=method
        )

    try:
        yield
    except ValidationError as exc:
        raise RequestValidationError(
            [
                {
                    "type": e["type"],
                    "loc": ("body", request_field(field_path(e["loc"]))),
                    "msg": e["msg"],
                    "input": e.get("input"),
                }
                for e in exc.errors()
            ]
        ) from exc
    except MedtuneError as exc:
        # ConflictingFields already names the medtune field at fault; a header is no spec field.
        if (
            exc.field
            and exc.field != idempotency.HEADER
            and not isinstance(exc, shapes.ConflictingFields)
        ):
            exc.field = request_field(exc.field)
        raise


@router.post("/jobs", response_model=FineTuningJob)
def create_fine_tuning_job(
    body: FineTuningJobCreate,
    session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
    principal: PrincipalDep,
    limiter: LimiterDep,
    response: Response,
    idempotency_key: IdempotencyKeyHeader = None,
) -> FineTuningJob:
    """Create a medtune job from an OpenAI fine-tuning request."""
    with _as_request_fields(body):
        spec = JobSpec.model_validate(
            shapes.spec_from_request(
                model=body.model,
                training_file=body.training_file,
                validation_file=body.validation_file,
                suffix=body.suffix,
                seed=body.seed,
                hyperparameters=body.hyperparameters.model_dump(),
                medtune=body.medtune,
                method=_method(body),
            )
        )
        # The same checks, routing and queueing as POST /jobs: one way in for every job.
        created, replayed = submit_job(
            session,
            settings,
            queue,
            spec,
            principal=principal,
            limiter=limiter,
            idempotency_key=idempotency_key,
        )
    if replayed:  # as POST /jobs: the first answer again, marked as a replay
        response.headers["Idempotent-Replayed"] = "true"
    return _job(session, jobs.get_job(session, created.id))


@router.get("/jobs", response_model=FineTuningJobsPage)
def list_fine_tuning_jobs(
    session: SessionDep, principal: PrincipalDep, after: After = None, limit: Limit = 20
) -> FineTuningJobsPage:
    """Jobs newest first; ``after`` is the id of the last job of the previous page."""
    cursor = None
    if after:
        try:
            cursor = jobs._encode_cursor(jobs.get_job(session, after, owner=principal.job_owner))
        except MedtuneError as exc:
            exc.field = "after"
            raise
    page, next_cursor = jobs.list_jobs(
        session, limit=limit, cursor=cursor, owner=principal.job_owner
    )
    return FineTuningJobsPage(
        data=[_job(session, j) for j in page], has_more=next_cursor is not None
    )


@router.get("/jobs/{job_id}", response_model=FineTuningJob)
def read_fine_tuning_job(
    session: SessionDep, principal: PrincipalDep, job_id: str
) -> FineTuningJob:
    """One job in OpenAI's shape."""
    return _job(session, jobs.get_job(session, job_id, owner=principal.job_owner))


@router.post("/jobs/{job_id}/cancel", response_model=FineTuningJob)
def cancel_fine_tuning_job(
    session: SessionDep, principal: PrincipalDep, job_id: str
) -> FineTuningJob:
    """Cancel a queued job now, or a running one at its next training step."""
    return _job(session, jobs.request_cancel(session, job_id, owner=principal.job_owner))


@router.get("/jobs/{job_id}/events", response_model=FineTuningEventsPage)
def list_fine_tuning_events(
    session: SessionDep,
    principal: PrincipalDep,
    job_id: str,
    after: After = None,
    limit: Limit = 20,
) -> FineTuningEventsPage:
    """Status messages and one metrics event per logged step, newest first."""
    job = jobs.get_job(session, job_id, owner=principal.job_owner)
    bound = shapes.metrics_before(shapes.event_key(job.id, after) if after else None)
    rows = _rows_before(session, job, before=bound, count=limit + 1)
    events, has_more = shapes.events_page(job, rows, after=after, limit=limit)
    return FineTuningEventsPage(
        data=[FineTuningJobEvent.model_validate(e) for e in events], has_more=has_more
    )


@router.get("/jobs/{job_id}/checkpoints", response_model=FineTuningCheckpointsPage)
def list_fine_tuning_checkpoints(
    session: SessionDep,
    principal: PrincipalDep,
    job_id: str,
    after: After = None,
    limit: Limit = 10,
) -> FineTuningCheckpointsPage:
    """The job's complete training checkpoints, newest first."""
    job = jobs.get_job(session, job_id, owner=principal.job_owner)
    found = checkpoints.for_job(job.artifacts_dir, job.spec)
    objects = [
        shapes.checkpoint_object(job, step=c.step, created_at=c.created_at, loss=c.loss)
        for c in reversed(found)
    ]
    if after:
        ids = [o["id"] for o in objects]
        objects = objects[ids.index(after) + 1 :] if after in ids else []
    page = [FineTuningCheckpoint.model_validate(o) for o in objects[:limit]]
    return FineTuningCheckpointsPage(
        data=page,
        has_more=len(objects) > limit,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
    )
