"""Idempotency-Key on job creation, the way Stripe does it.

A retried POST /jobs with the same key (per API key) gets the job the first request created,
with the same status (201) and ``Idempotent-Replayed: true``, and nothing is queued again. The
same key with a different spec is refused (409 ``idempotency_key_reused``). The key row is
committed in the same transaction as its job, so a job exists exactly when its key does; two
concurrent requests with one key meet at the unique (scope, key) index and the loser replays.

Only a created job is remembered: a request refused before that (a bad spec, a rate limit) may
be retried with the same key. Keys are kept as long as their job.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from core import jobs
from core.errors import ConflictError
from core.models import IdempotencyKey, Job
from core.spec import JobSpec

HEADER = "Idempotency-Key"


class IdempotencyKeyReused(ConflictError):
    code = "idempotency_key_reused"


def fingerprint(spec: JobSpec) -> str:
    """SHA-256 of the normalised spec: the same request however its JSON was written."""
    canonical = json.dumps(spec.to_json(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def replay(session: Session, *, scope: str, key: str, spec: JobSpec) -> Job | None:
    """The job an earlier request with this key created, or None; 409 if its spec differed."""
    row = session.exec(
        select(IdempotencyKey).where(IdempotencyKey.scope == scope, IdempotencyKey.key == key)
    ).first()
    if row is None:
        return None
    if row.fingerprint != fingerprint(spec):
        raise IdempotencyKeyReused(
            f"{HEADER} {key!r} was already used for a different job spec (job {row.job_id}); "
            "send a new key for a new job",
            field=HEADER,
        )
    return jobs.get_job(session, row.job_id)


def create_job_once(
    session: Session,
    spec: JobSpec,
    *,
    scope: str,
    key: str,
    **create_kwargs: Any,
) -> tuple[Job, bool]:
    """Create the job with its key row, or replay the job a concurrent request created.

    Returns (job, replayed).
    """
    record = IdempotencyKey(scope=scope, key=key, fingerprint=fingerprint(spec), job_id="")
    try:
        return jobs.create_job(session, spec, idempotency=record, **create_kwargs), False
    except IntegrityError:
        session.rollback()
        found = replay(session, scope=scope, key=key, spec=spec)
        if found is None:
            raise  # some other constraint failed
        return found, True
