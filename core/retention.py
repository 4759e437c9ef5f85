"""Retention: finished jobs and unused uploads older than ``MEDTUNE_RETENTION_DAYS`` go.

A job is old when it finished (or, never started, was created) more than that many days ago; it
goes as ``DELETE /jobs/{id}`` would take it (core.store.purge). An uploaded file goes when it is
that old and no job that stays names it. Queued and running jobs, and the files they read,
always stay. Workers sweep every ``MEDTUNE_RETENTION_INTERVAL_S`` (worker/retention.py);
``medtune retention --dry-run`` lists what a sweep would remove, without removing it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from core.errors import MedtuneError
from core.settings import Settings
from core.store import files, purge
from core.store.jobs import TERMINAL
from core.store.models import DataFile, Job, utcnow

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What a sweep removes (or, dry, would remove): one dict per job and per file."""

    cutoff: datetime
    jobs: list[dict[str, Any]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"cutoff": self.cutoff.isoformat(), "jobs": self.jobs, "files": self.files}


def _aware(stamp: datetime) -> datetime:
    # SQLite hands back naive datetimes; every stamp we store is UTC.
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=utcnow().tzinfo)


def plan(session: Session, *, days: float, now: datetime | None = None) -> Plan:
    """The jobs and files older than ``days`` that a sweep removes."""
    cutoff = (now or utcnow()) - timedelta(days=days)
    ended = func.coalesce(col(Job.finished_at), col(Job.created_at))
    old_jobs = session.exec(
        select(Job.id, Job.status, ended)
        .where(col(Job.status).in_(TERMINAL), ended < cutoff)
        .order_by(ended)
    ).all()
    going = {job_id for job_id, _, _ in old_jobs}
    result = Plan(cutoff=cutoff)
    result.jobs = [
        {"id": job_id, "status": status, "ended_at": _aware(stamp).isoformat()}
        for job_id, status, stamp in old_jobs
    ]
    # A file stays while any job that stays names it (a queued job still has to read it).
    named = {
        file_id
        for job_id, spec in session.exec(select(Job.id, Job.spec)).all()
        if job_id not in going
        for _, file_id in files.file_refs(spec)
    }
    old_files = session.exec(
        select(DataFile).where(col(DataFile.created_at) < cutoff).order_by(col(DataFile.created_at))
    ).all()
    result.files = [
        {
            "id": row.id,
            "filename": row.filename,
            "bytes": row.bytes,
            "created_at": _aware(row.created_at).isoformat(),
        }
        for row in old_files
        if row.id not in named
    ]
    return result


def sweep(session: Session, settings: Settings, *, days: float, dry_run: bool = False) -> Plan:
    """Remove (unless ``dry_run``) what :func:`plan` lists; returns what went.

    An entry another actor changed meanwhile (deleted already, or a file a new job now names)
    is skipped and left out of the result.
    """
    todo = plan(session, days=days)
    if dry_run:
        return todo
    done = Plan(cutoff=todo.cutoff)
    for entry in todo.jobs:
        try:
            purge.delete_job(
                session,
                entry["id"],
                owner=None,
                artifacts_dir=settings.artifacts_dir,
                prepared_cache_dir=settings.prepared_cache_dir,
            )
        except MedtuneError as exc:
            session.rollback()
            log.info("retention kept job %s: %s", entry["id"], exc.code)
            continue
        done.jobs.append(entry)
    for entry in todo.files:
        try:
            files.delete_file(session, entry["id"], owner=None, uploads_dir=settings.uploads_dir)
        except MedtuneError as exc:
            session.rollback()
            log.info("retention kept file %s: %s", entry["id"], exc.code)
            continue
        done.files.append(entry)
    if done.jobs or done.files:
        log.warning(
            "retention (%g days) removed %d job(s) and %d file(s)",
            days,
            len(done.jobs),
            len(done.files),
        )
    return done
