"""Job store operations. State changes are conditional UPDATEs, so two actors never both win."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, delete, func, insert, or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from core.errors import JobNotCancellable, JobNotFound, MedtuneError
from core.spec import JobSpec
from core.store.models import IdempotencyKey, Job, JobStatus, MetricRow, Worker, utcnow

METRIC_FIELDS = (
    "loss",
    "learning_rate",
    "grad_norm",
    "epoch",
    "tokens_per_second",
    "samples_per_second",
    "memory_mb",
    "reserved_memory_mb",
    "peak_memory_mb",
    "eta_seconds",
    "eval_loss",
    "rewards_chosen",
    "rewards_rejected",
    "rewards_margin",
    "rewards_accuracy",
    "eval_rewards_margin",
    "eval_rewards_accuracy",
)
DEFAULT_LEASE_S = 300.0  # a worker renews its lease every third of this
TERMINAL = [s.value for s in JobStatus if s.terminal]


class InvalidCursor(MedtuneError):
    code = "invalid_cursor"
    status = 400


def create_job(
    session: Session,
    spec: JobSpec,
    *,
    queue: str | None = None,
    estimated_gpu_memory_gib: float | None = None,
    owner_key_id: str | None = None,
    idempotency: IdempotencyKey | None = None,
) -> Job:
    """Store a queued job; with ``idempotency``, that key row is committed with it (or neither)."""
    job = Job(
        base_model=spec.model.base_model,
        finetuned_model=spec.model.finetuned_model,
        spec=spec.to_json(),
        updated_at=utcnow(),
        queue=queue,
        estimated_gpu_memory_gib=estimated_gpu_memory_gib,
        owner_key_id=owner_key_id,
        webhook_state="pending" if spec.webhook else None,
    )
    session.add(job)
    if idempotency is not None:
        session.flush()  # the job row first: the key row refers to it
        idempotency.job_id = job.id
        session.add(idempotency)
    session.commit()
    session.refresh(job)
    return job


def get_job(session: Session, job_id: str, *, owner: str | None = None) -> Job:
    """The job; with ``owner``, only if that API key owns it (else the same 404 as no job)."""
    # An id with NUL (from a JSON body) cannot exist, and Postgres would refuse the query.
    job = None if "\x00" in job_id else session.get(Job, job_id)
    if job is None or (owner is not None and job.owner_key_id != owner):
        raise JobNotFound(f"no job with id {job_id!r}", field="job_id")
    return job


def _encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, job_id = raw.split("|", 1)
        return datetime.fromisoformat(stamp), job_id
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidCursor(
            "cursor is not one this API returned; pass next_cursor from a previous page",
            field="cursor",
        ) from exc


def list_jobs(
    session: Session,
    *,
    limit: int,
    cursor: str | None = None,
    status: str | None = None,
    owner: str | None = None,
) -> tuple[Sequence[Job], str | None]:
    """Newest first; returns the page and the cursor of the next one (None at the end).

    With ``owner``, only the jobs of that API key.
    """
    query = select(Job)
    if owner is not None:
        query = query.where(Job.owner_key_id == owner)
    if status:
        query = query.where(Job.status == status)
    if cursor:
        created, job_id = _decode_cursor(cursor)
        query = query.where(
            or_(
                col(Job.created_at) < created,
                and_(col(Job.created_at) == created, col(Job.id) < job_id),
            )
        )
    query = query.order_by(col(Job.created_at).desc(), col(Job.id).desc()).limit(limit + 1)
    rows = session.exec(query).all()
    page = rows[:limit]
    return page, (_encode_cursor(page[-1]) if len(rows) > limit else None)


def _update(session: Session, job_id: str, where: Any, **values: Any) -> bool:
    values["updated_at"] = utcnow()
    result = session.execute(update(Job).where(col(Job.id) == job_id).where(where).values(**values))
    session.commit()
    return bool(result.rowcount)


def request_cancel(session: Session, job_id: str, *, owner: str | None = None) -> Job:
    """Queued jobs are cancelled now; running ones stop at their next step boundary."""
    job = get_job(session, job_id, owner=owner)
    if _update(
        session,
        job_id,
        col(Job.status) == JobStatus.queued,
        status=JobStatus.cancelled,
        finished_at=utcnow(),
        cancel_requested=True,
    ):
        pass
    elif not _update(session, job_id, col(Job.status) == JobStatus.running, cancel_requested=True):
        session.refresh(job)
        raise JobNotCancellable(
            f"job {job_id} is already {job.status}; only queued or running jobs can be cancelled",
            field="job_id",
        )
    session.refresh(job)
    return job


def claim(session: Session, job_id: str, *, worker: str, lease_s: float = DEFAULT_LEASE_S) -> bool:
    """Move a queued job to running under a lease; False if it is not queued (any more).

    ``started_at`` is the first attempt's: a resumed job's duration includes its lost runs.
    Each attempt is recorded in ``attempt_log`` (worker, start; its end and outcome later).
    """
    now = utcnow()
    claimed = _update(
        session,
        job_id,
        col(Job.status) == JobStatus.queued,
        status=JobStatus.running,
        started_at=func.coalesce(col(Job.started_at), now),
        worker=worker,
        lease_expires_at=now + timedelta(seconds=lease_s),
        attempts=Job.attempts + 1,
    )
    if claimed:
        job = get_job(session, job_id)
        session.refresh(job)
        attempt = {"attempt": job.attempts, "worker": worker, "started_at": now.isoformat()}
        job.attempt_log = [*(job.attempt_log or []), attempt]
        session.add(job)
        session.commit()
    return claimed


def _end_attempt(session: Session, job_id: str, outcome: str) -> None:
    """Close the job's last open attempt with ``outcome`` (the job is no one's to race for)."""
    job = get_job(session, job_id)
    session.refresh(job)
    log = [dict(a) for a in job.attempt_log or []]
    if log and "ended_at" not in log[-1]:
        log[-1] |= {"ended_at": utcnow().isoformat(), "outcome": outcome}
        job.attempt_log = log
        session.add(job)
        session.commit()


def renew_lease(session: Session, job_id: str, *, worker: str, lease_s: float) -> bool:
    """Extend the running worker's lease; False if the job is no longer this worker's."""
    return _update(
        session,
        job_id,
        and_(col(Job.status) == JobStatus.running, col(Job.worker) == worker),
        lease_expires_at=utcnow() + timedelta(seconds=lease_s),
    )


def _requeue(session: Session, where: Any, why: str) -> list[str]:
    """Running jobs matching ``where`` go back to queued, to be resumed from their checkpoint.

    Returns the ids requeued; the conditional UPDATE makes two reconcilers agree on each job.
    """
    now = utcnow()
    running = and_(col(Job.status) == JobStatus.running, where)
    requeued = []
    for job_id in session.exec(select(Job.id).where(running)).all():
        if _update(
            session,
            job_id,
            running,
            status=JobStatus.queued,
            stage=None,
            lease_expires_at=None,
            enqueued_at=None,  # the reconciler sends it again
        ):
            _end_attempt(session, job_id, why)
            add_note(session, job_id, f"{why} ({now:%Y-%m-%d %H:%M:%S} UTC); requeued")
            requeued.append(job_id)
    return requeued


def requeue_lapsed(session: Session, *, workers_dead_before: datetime | None = None) -> list[str]:
    """Requeue running jobs whose worker stopped renewing its lease, or (with
    ``workers_dead_before``) whose worker's last heartbeat is older than that: a worker
    killed outright is noticed within a few heartbeats instead of a whole lease."""
    lapsed: Any = col(Job.lease_expires_at) < utcnow()
    if workers_dead_before is not None:
        dead = select(Worker.name).where(col(Worker.last_seen) < workers_dead_before)
        lapsed = or_(lapsed, col(Job.worker).in_(dead))
    return _requeue(session, lapsed, "worker lost")


def requeue_held_by(session: Session, worker: str) -> list[str]:
    """At a worker's start: the running jobs its name holds lost their run when the process
    with that name died (names are unique), so they are requeued now, not when the lease ends."""
    return _requeue(session, col(Job.worker) == worker, "worker restarted")


def mark_enqueued(session: Session, job_id: str) -> None:
    _update(session, job_id, col(Job.status) == JobStatus.queued, enqueued_at=utcnow())


def needs_enqueue(session: Session, *, grace_s: float, resend_after_s: float) -> list[Job]:
    """Queued jobs the broker may not hold: never sent (the API died, or the broker was down,
    between commit and send) or sent long ago (the broker may have lost its data since).

    Sending again is safe: a task first claims its job, so a duplicate does nothing.
    """
    now = utcnow()
    never = and_(
        col(Job.enqueued_at).is_(None), col(Job.created_at) < now - timedelta(seconds=grace_s)
    )
    stale = col(Job.enqueued_at) < now - timedelta(seconds=resend_after_s)
    return list(
        session.exec(select(Job).where(Job.status == JobStatus.queued, or_(never, stale))).all()
    )


def delete_metrics_after(session: Session, job_id: str, step: int) -> None:
    """Drop rows past the checkpoint a resumed run restarts from, so its curve has no seam."""
    session.execute(
        delete(MetricRow).where(col(MetricRow.job_id) == job_id, col(MetricRow.step) > step)
    )
    session.execute(update(Job).where(col(Job.id) == job_id).values(steps_done=step))
    session.commit()


def set_fields(session: Session, job_id: str, **values: Any) -> None:
    _update(session, job_id, col(Job.status) == JobStatus.running, **values)


def add_note(session: Session, job_id: str, note: str) -> None:
    job = get_job(session, job_id)
    job.notes = [*job.notes, note]
    job.updated_at = utcnow()
    session.add(job)
    session.commit()


def finish(
    session: Session,
    job_id: str,
    status: JobStatus,
    *,
    error_code: str | None = None,
    error_message: str | None = None,
    worker: str | None = None,
    **values: Any,
) -> None:
    """End a running job; with ``worker``, only while that worker still holds it."""
    held = col(Job.status) == JobStatus.running
    if worker is not None:
        held = and_(held, col(Job.worker) == worker)
    if _update(
        session,
        job_id,
        held,
        status=status,
        stage=None,
        finished_at=utcnow(),
        error_code=error_code,
        error_message=error_message,
        **values,
    ):
        _end_attempt(session, job_id, str(status))


def cancel_requested(session: Session, job_id: str) -> bool:
    value = session.exec(select(Job.cancel_requested).where(Job.id == job_id)).first()
    return bool(value)


def _metric_values(job_id: str, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "step": int(row["step"]),
        # A batched row keeps the time its step was logged: step times are read off it.
        "created_at": row.get("created_at") or utcnow(),
        **{k: row.get(k) for k in METRIC_FIELDS},
    }


def add_metrics(session: Session, job_id: str, rows: Sequence[dict[str, Any]]) -> None:
    """Append step rows; a step already stored is never doubled.

    A row for a stored step (an eval loss measured after its step's row was written, or a
    replay after a crash) only fills the stored row's empty fields: a stored value is kept.
    """
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    known = {
        m.step: m
        for m in session.exec(
            select(MetricRow).where(MetricRow.job_id == job_id, col(MetricRow.step).in_(steps))
        ).all()
    }
    fresh = [r for r in rows if int(r["step"]) not in known]
    for row in rows:
        stored = known.get(int(row["step"]))
        if stored is None:
            continue
        for key in METRIC_FIELDS:
            if getattr(stored, key) is None and row.get(key) is not None:
                setattr(stored, key, row[key])
        session.add(stored)
    try:
        if fresh:
            # One INSERT for the batch, no ORM objects: building a MetricRow costs about a
            # millisecond, which every step would pay (BENCHMARKS.md, metrics path).
            session.execute(insert(MetricRow), [_metric_values(job_id, row) for row in fresh])
        session.execute(
            update(Job)
            .where(col(Job.id) == job_id)
            # Only forward: a replayed batch of old steps must not move progress back.
            .values(
                steps_done=case(
                    (col(Job.steps_done) < max(steps), max(steps)), else_=col(Job.steps_done)
                ),
                updated_at=utcnow(),
            )
        )
        session.commit()
    except IntegrityError:
        session.rollback()
        for row in fresh:  # a concurrent writer stored some of them: fall back to one by one
            add_metrics(session, job_id, [row])


def metrics_page(
    session: Session, job_id: str, *, after_step: int, limit: int
) -> tuple[Sequence[MetricRow], bool]:
    rows = session.exec(
        select(MetricRow)
        .where(MetricRow.job_id == job_id, col(MetricRow.step) > after_step)
        .order_by(col(MetricRow.step))
        .limit(limit + 1)
    ).all()
    return rows[:limit], len(rows) > limit
