"""/jobs: create, list, read, cancel, and follow a job's metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel

from api.deps import (
    IdempotencyKeyHeader,
    LimiterDep,
    PrincipalDep,
    QueueDep,
    SessionDep,
    SettingsDep,
)
from api.schemas import (
    CheckpointPublic,
    CheckpointsPage,
    JobPublic,
    JobsPublic,
    MetricPublic,
    MetricsPage,
)
from core.errors import ConflictError, NotFoundError
from core.evaluation import EVALUATION_FILE
from core.export.formats import MANIFEST
from core.spec import JobSpec
from core.store import jobs, purge
from core.store.db import session_scope
from core.store.models import Job, JobStatus
from core.submit import submit_job
from core.training import checkpoints

log = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])
# Steps are 32-bit integers in the job store: a larger after_step would overflow the query.
MAX_STEP = 2**31 - 1

SPEC_EXAMPLE = {
    "model_config": {
        "base_model": "smollm2-135m-instruct",
        "finetuned_model": "smollm2-medical",
        "max_seq_length": 512,
    },
    "training_dataset": {"name": "sample:medical_qa"},
    "training_config": {"max_steps": 30, "learning_rate": 1e-3},
}


@router.post("", status_code=201, response_model=JobPublic)
def create_job(
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
    principal: PrincipalDep,
    limiter: LimiterDep,
    spec: Annotated[JobSpec, Body(openapi_examples={"embedded": {"value": SPEC_EXAMPLE}})],
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobPublic:
    """Validate a job spec, store the job, then queue it for a worker that can hold it."""
    job, replayed = submit_job(
        session,
        settings,
        queue,
        spec,
        principal=principal,
        limiter=limiter,
        idempotency_key=idempotency_key,
    )
    if replayed:
        # Stripe's behaviour: the first request's status code again, marked as a replay.
        response.headers["Idempotent-Replayed"] = "true"
    return JobPublic.of(job)


@router.get("", response_model=JobsPublic)
def list_jobs(
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    status: JobStatus | None = None,
) -> JobsPublic:
    """Jobs, newest first; follow next_cursor for older ones."""
    page, next_cursor = jobs.list_jobs(
        session, limit=limit, cursor=cursor, status=status, owner=principal.job_owner
    )
    return JobsPublic(
        data=[JobPublic.of(j) for j in page],
        has_more=next_cursor is not None,
        next_cursor=next_cursor,
    )


@router.get("/{job_id}", response_model=JobPublic)
def read_job(session: SessionDep, principal: PrincipalDep, job_id: str) -> JobPublic:
    """One job with its status, stage, progress, error and artifacts."""
    return JobPublic.of(jobs.get_job(session, job_id, owner=principal.job_owner))


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(session: SessionDep, principal: PrincipalDep, job_id: str) -> JobPublic:
    """Cancel a queued job now, or a running one at its next training step."""
    return JobPublic.of(jobs.request_cancel(session, job_id, owner=principal.job_owner))


class JobDeleted(BaseModel):
    id: str
    object: Literal["job"] = "job"
    deleted: bool = True


@router.delete("/{job_id}", response_model=JobDeleted)
def delete_job(
    session: SessionDep, settings: SettingsDep, principal: PrincipalDep, job_id: str
) -> JobDeleted:
    """Delete a finished job: its row, metrics, artifacts, checkpoints, evaluation and logs."""
    purge.delete_job(
        session,
        job_id,
        owner=principal.job_owner,
        artifacts_dir=settings.artifacts_dir,
        prepared_cache_dir=settings.prepared_cache_dir,
    )
    return JobDeleted(id=job_id)


@router.get("/{job_id}/metrics", response_model=MetricsPage)
def read_metrics(
    session: SessionDep,
    principal: PrincipalDep,
    job_id: str,
    after_step: Annotated[int, Query(ge=-1, le=MAX_STEP)] = -1,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> MetricsPage:
    """Per-step training metrics after a step, for polling."""
    job = jobs.get_job(session, job_id, owner=principal.job_owner)
    rows, has_more = jobs.metrics_page(session, job_id, after_step=after_step, limit=limit)
    return MetricsPage(
        job_id=job_id,
        status=job.status,
        data=[MetricPublic.of(r) for r in rows],
        has_more=has_more,
        last_step=rows[-1].step if rows else None,
    )


@router.get("/{job_id}/checkpoints", response_model=CheckpointsPage)
def list_checkpoints(session: SessionDep, principal: PrincipalDep, job_id: str) -> CheckpointsPage:
    """The job's complete training checkpoints, oldest first."""
    job = jobs.get_job(session, job_id, owner=principal.job_owner)
    found = checkpoints.for_job(job.artifacts_dir, job.spec)
    return CheckpointsPage(
        job_id=job_id,
        data=[CheckpointPublic(step=c.step, created_at=c.created_at, loss=c.loss) for c in found],
    )


@router.get("/{job_id}/evaluation")
def read_evaluation(session: SessionDep, principal: PrincipalDep, job_id: str) -> dict[str, Any]:
    """Base vs tuned scores (ROUGE-1/2/L, BLEU, METEOR where available) and answers side by side."""
    job = jobs.get_job(session, job_id, owner=principal.job_owner)
    path = Path(job.artifacts_dir or "", EVALUATION_FILE)
    if not job.artifacts_dir or not path.is_file():
        raise ConflictError(
            f"job {job_id} has no evaluation (status {job.status}); set evaluation_config.enabled "
            "and a validation_dataset (or training_dataset.validation_share), and wait for the "
            "job to succeed",
            field="job_id",
            code="evaluation_not_ready",
        )
    return {"object": "evaluation", "job_id": job_id, **json.loads(path.read_text())}


def _manifest(job: Job) -> dict[str, Any]:
    path = Path(job.artifacts_dir or "", MANIFEST)
    if not job.artifacts_dir or not path.is_file():
        raise ConflictError(
            f"job {job.id} has no exported artifacts yet (status {job.status})",
            field="job_id",
            code="artifacts_not_ready",
        )
    return json.loads(path.read_text())


@router.get("/{job_id}/artifacts")
def list_artifacts(session: SessionDep, principal: PrincipalDep, job_id: str) -> dict[str, Any]:
    """Exported formats with their files (size, sha256) and smoke-test answers."""
    job = jobs.get_job(session, job_id, owner=principal.job_owner)
    return {"object": "artifacts", "job_id": job_id, "formats": _manifest(job)}


@router.get("/{job_id}/artifacts/{fmt}/{file_name}", response_class=FileResponse)
def download_artifact(
    session: SessionDep, principal: PrincipalDep, job_id: str, fmt: str, file_name: str
) -> FileResponse:
    """Stream one exported file; only files the manifest lists can be fetched."""
    job = jobs.get_job(session, job_id, owner=principal.job_owner)
    entry = _manifest(job).get(fmt)
    listed = {f["file"]: f for f in (entry or {}).get("files", [])}
    if file_name not in listed:
        raise NotFoundError(
            f"job {job_id} has no artifact {fmt}/{file_name}; see GET /jobs/{job_id}/artifacts",
            field="file_name",
            code="artifact_not_found",
        )
    path = Path(job.artifacts_dir or "", entry["folder"], file_name)  # type: ignore[index]
    if not path.is_file():
        raise NotFoundError(
            f"artifact {fmt}/{file_name} of job {job_id} was deleted from the server",
            field="file_name",
            code="artifact_missing",
        )
    return FileResponse(
        path, filename=file_name, headers={"X-Checksum-Sha256": listed[file_name]["sha256"]}
    )


def _resume_step(last_event_id: str | None, after_step: int) -> int:
    """The last step a reconnecting client saw; a malformed Last-Event-ID is ignored."""
    # Not str.isdigit(): it accepts '\u00b2' and numbers too big for the store, and int() of
    # those fails or overflows the query.
    if last_event_id and re.fullmatch(r"[0-9]{1,10}", last_event_id):
        return min(int(last_event_id), MAX_STEP)
    return after_step


def _sse(event: str, data: dict[str, Any], event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
def stream_events(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    job_id: str,
    last_event_id: Annotated[str | None, Header()] = None,
    after_step: Annotated[int, Query(ge=-1, le=MAX_STEP)] = -1,
    poll_seconds: Annotated[float, Query(gt=0, le=10)] = 0.5,
) -> StreamingResponse:
    """Metrics as Server-Sent Events (event id = step, resumable with Last-Event-ID)."""
    owner = principal.job_owner
    jobs.get_job(session, job_id, owner=owner)  # 404 before the stream starts
    # The request's session would keep its pooled connection until the stream ends: 50 open
    # streams exhausted the pool (30) and every other request timed out with a 500. The stream
    # polls with short sessions of its own.
    session.close()
    start = _resume_step(last_event_id, after_step)
    url = settings.db_url

    def poll(after: int) -> tuple[list[MetricPublic], str, dict[str, Any]]:
        with session_scope(url) as s:
            job = jobs.get_job(s, job_id, owner=owner)
            rows, _ = jobs.metrics_page(s, job_id, after_step=after, limit=500)
            return (
                [MetricPublic.of(r) for r in rows],
                job.status,
                JobPublic.of(job).model_dump(
                    mode="json",
                    include={"id", "status", "stage", "steps_done", "steps_total", "error"},
                ),
            )

    async def events() -> AsyncIterator[str]:
        after, last_state = start, None
        yield "retry: 2000\n\n"
        while True:
            rows, status, state = await run_in_threadpool(poll, after)
            for row in rows:
                after = row.step
                yield _sse("metric", row.model_dump(mode="json"), row.step)
            if state != last_state:
                last_state = state
                yield _sse("status", state)
            if JobStatus(status).terminal and not rows:
                yield _sse("end", state)
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(poll_seconds)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
