"""Idempotency-Key on job creation and file uploads, the way Stripe does it.

A retried POST /jobs with the same key (per API key) gets the job the first request created,
with the same status (201) and ``Idempotent-Replayed: true``, and nothing is queued again. The
same key with a different spec is refused (409 ``idempotency_key_reused``). The key row is
committed in the same transaction as its job, so a job exists exactly when its key does; two
concurrent requests with one key meet at the unique (scope, key) index and the loser replays.

Only a created job is remembered: a request refused before that (a bad spec, a rate limit) may
be retried with the same key. Keys are kept as long as their job.

POST /files works the same way (core.store.files): the key row is committed with the file's row, and
a retry of the same upload (same bytes, name and purpose) gets the first file. One key names
one request, a job or an upload, as Stripe's keys do across endpoints.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from core.errors import ConflictError
from core.spec import JobSpec
from core.store import jobs
from core.store.models import DataFile, IdempotencyKey, Job

HEADER = "Idempotency-Key"


class IdempotencyKeyReused(ConflictError):
    code = "idempotency_key_reused"


def fingerprint(spec: JobSpec) -> str:
    """SHA-256 of the normalised spec: the same request however its JSON was written."""
    canonical = json.dumps(spec.to_json(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def upload_fingerprint(*, sha256: str, filename: str, purpose: str) -> str:
    """SHA-256 of an upload: the same bytes under the same name and purpose are one request."""
    return hashlib.sha256(f"{sha256}\n{purpose}\n{filename}".encode()).hexdigest()


def _earlier(session: Session, *, scope: str, key: str) -> IdempotencyKey | None:
    return session.exec(
        select(IdempotencyKey).where(IdempotencyKey.scope == scope, IdempotencyKey.key == key)
    ).first()


def _reused(key: str, row: IdempotencyKey) -> IdempotencyKeyReused:
    what = f"job {row.job_id}" if row.job_id else f"file {row.file_id}"
    return IdempotencyKeyReused(
        f"{HEADER} {key!r} was already used for a different request ({what}); send a new key "
        "for a new request",
        field=HEADER,
    )


def replay(session: Session, *, scope: str, key: str, spec: JobSpec) -> Job | None:
    """The job an earlier request with this key created, or None; 409 if its spec differed."""
    row = _earlier(session, scope=scope, key=key)
    if row is None:
        return None
    if row.job_id is None or row.fingerprint != fingerprint(spec):
        raise _reused(key, row)
    return jobs.get_job(session, row.job_id)


def replay_upload(session: Session, *, scope: str, key: str, upload: str) -> DataFile | None:
    """The file an earlier upload with this key stored, or None; 409 if that upload differed.

    ``upload`` is the new request's :func:`upload_fingerprint`.
    """
    row = _earlier(session, scope=scope, key=key)
    if row is None:
        return None
    found = session.get(DataFile, row.file_id) if row.file_id else None
    if found is None or row.fingerprint != upload:
        raise _reused(key, row)
    return found


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
