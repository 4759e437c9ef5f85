"""Removing a finished job for good: its row, metric rows, idempotency keys and its folder.

Medical training data must be removable. A job's folder (``$MEDTUNE_HOME/jobs/<id>/``) holds
everything the job wrote: checkpoints, the adapter, exports, the evaluation with its answers,
TensorBoard event files and the spec; the job store holds its row and metric rows; the
prepared-data cache may hold its tokenized data (``core.data.prepared_cache``, an entry shared
with the jobs that prepared the same data). Deleting a job removes all of these and nothing else:
uploaded files are the uploader's to delete (``DELETE /files/{id}``), or go with retention
(core.retention).

Only a terminal job may go: a queued or running one is still written to (409 ``job_not_finished``:
cancel it first). The rows go first, in one transaction, then the folder: a crash in between
leaves bytes no id leads to, never an id whose files are half gone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sqlalchemy import delete
from sqlmodel import Session, col, select

from core.continuation import continuing_jobs
from core.data.prepared_cache import forget_for_jobs
from core.errors import ConflictError
from core.export.formats import MANIFEST
from core.store.jobs import get_job
from core.store.models import IdempotencyKey, Job, JobStatus, MetricRow


class JobNotFinished(ConflictError):
    code = "job_not_finished"


class ExportRunning(ConflictError):
    code = "export_running"


class AdapterInUse(ConflictError):
    code = "adapter_in_use"


def job_folders(job: Job, artifacts_dir: Path) -> list[Path]:
    """The job's folders under ``artifacts_dir``: its own, and the one its row names if that
    differs but lies in the same place (a path outside the artifacts folder is never removed)."""
    root = artifacts_dir.resolve()
    found = [root / job.id]
    if job.artifacts_dir:
        named = Path(job.artifacts_dir).resolve()
        if named != root and named.is_relative_to(root) and named not in found:
            found.append(named)
    return found


def _export_running(job: Job, artifacts_dir: Path) -> bool:
    for folder in job_folders(job, artifacts_dir):
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        if any(isinstance(e, dict) and e.get("status") == "running" for e in manifest.values()):
            return True
    return False


def delete_job(
    session: Session,
    job_id: str,
    *,
    owner: str | None,
    artifacts_dir: Path,
    prepared_cache_dir: Path,
) -> list[Path]:
    """Delete a terminal job's rows, folder and prepared-data cache entry; returns the folders
    removed. ``prepared_cache_dir``: the settings' (``$MEDTUNE_HOME/cache/prepared``).

    404 for a job the caller does not own; 409 ``job_not_finished`` while it is queued or
    running, ``export_running`` while a later export writes into its folder.
    """
    get_job(session, job_id, owner=owner)  # 404 first, with the same answer as no job
    # Locked (Postgres) so a concurrent cancel or claim waits for the delete, then finds nothing.
    job = session.exec(select(Job).where(Job.id == job_id).with_for_update()).one()
    if not JobStatus(job.status).terminal:
        raise JobNotFinished(
            f"job {job_id} is {job.status}; cancel it first (POST /jobs/{job_id}/cancel, or "
            f"medtune jobs cancel {job_id}) and delete it once it is cancelled",
            field="job_id",
        )
    if _export_running(job, artifacts_dir):
        raise ExportRunning(
            f"an export of job {job_id} is still writing its files; wait until GET "
            f"/jobs/{job_id}/artifacts shows no entry running, then delete it",
            field="job_id",
        )
    users = continuing_jobs(session, job_id)
    if users:
        raise AdapterInUse(
            f"queued or running job(s) {', '.join(users[:5])} start from job {job_id}'s "
            "adapter; cancel them or wait until they end, then delete it",
            field="job_id",
        )
    folders = job_folders(job, artifacts_dir)
    session.execute(delete(MetricRow).where(col(MetricRow.job_id) == job_id))
    session.execute(delete(IdempotencyKey).where(col(IdempotencyKey.job_id) == job_id))
    session.execute(delete(Job).where(col(Job.id) == job_id))
    session.commit()
    forget_for_jobs(folders, prepared_cache_dir)  # the key is in the folder: first
    removed = []
    for folder in folders:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
