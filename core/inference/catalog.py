"""Which models a caller may ask through ``/v1``: base models and its own succeeded jobs.

A ``model`` is a job id, a job's ``finetuned_model`` name (the newest succeeded job of that
name), or a base model: the embedded default, or the base of one of the caller's jobs (so a
client cannot make a worker fetch an arbitrary Hub model). Another key's jobs are invisible:
the same 404 ``model_not_found`` as a name that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session, col, select

from core.embedded_model import EMBEDDED_MODEL_NAME, is_embedded
from core.errors import JobNotReady, NotFoundError
from core.store.models import Job, JobStatus


class ModelNotFound(NotFoundError):
    code = "model_not_found"


@dataclass(frozen=True)
class ModelTarget:
    job: Job | None  # None: a base model, no adapter
    base_model: str


def _owned(owner: str | None) -> Any:
    query = select(Job)
    if owner is not None:
        query = query.where(Job.owner_key_id == owner)
    return query


def resolve_model(session: Session, name: str, *, owner: str | None) -> ModelTarget:
    job = session.get(Job, name)
    if job is not None and (owner is None or job.owner_key_id == owner):
        if job.status != JobStatus.succeeded:
            raise JobNotReady(
                f"job {job.id} is {job.status}; its model can be asked once it has succeeded",
                field="model",
            )
        return ModelTarget(job=job, base_model=job.base_model)
    named = session.exec(
        _owned(owner)
        .where(Job.finetuned_model == name, Job.status == JobStatus.succeeded)
        .order_by(col(Job.created_at).desc())
        .limit(1)
    ).first()
    if named is not None:
        return ModelTarget(job=named, base_model=named.base_model)
    if is_embedded(name):
        return ModelTarget(job=None, base_model=EMBEDDED_MODEL_NAME)
    based = session.exec(_owned(owner).where(Job.base_model == name).limit(1)).first()
    if based is not None:
        return ModelTarget(job=None, base_model=based.base_model)
    raise ModelNotFound(
        f"no model {name!r}: use a job id, a succeeded job's finetuned_model or a base model "
        "(GET /v1/models lists them)",
        field="model",
    )


def _unix(stamp: datetime | None) -> int:
    if stamp is None:
        return 0
    return int((stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp())


def list_models(session: Session, *, owner: str | None) -> list[dict[str, Any]]:
    """OpenAI ``model`` objects: base models first, then succeeded jobs, newest first."""
    jobs = session.exec(_owned(owner).order_by(col(Job.created_at).desc())).all()
    bases = {EMBEDDED_MODEL_NAME: 0}
    for job in reversed(jobs):
        name = EMBEDDED_MODEL_NAME if is_embedded(job.base_model) else job.base_model
        bases.setdefault(name, _unix(job.created_at))
    models = [
        {"id": name, "object": "model", "created": created, "owned_by": "medtune"}
        for name, created in bases.items()
    ]
    models += [
        {
            "id": job.id,
            "object": "model",
            "created": _unix(job.finished_at or job.created_at),
            "owned_by": "user",
            "parent": job.base_model,
            "finetuned_model": job.finetuned_model,
        }
        for job in jobs
        if job.status == JobStatus.succeeded
    ]
    return models
