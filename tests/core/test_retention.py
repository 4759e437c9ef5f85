"""Retention: old finished jobs and old uploads no staying job names go; everything else stays."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import update
from sqlmodel import col, select

from core import retention
from core.settings import Settings
from core.spec import JobSpec
from core.store import files, jobs
from core.store.db import session_scope
from core.store.models import DataFile, Job, JobStatus, utcnow
from tests.api.test_job_delete import files_under, write_artifacts
from tests.helpers import recipe_spec
from worker.retention import sweep_once


def _upload(url: str, home: Path, name: str, *, days_old: float) -> str:
    upload = files.Upload(uploads_dir=home / "data" / "uploads", filename=name, max_bytes=10**6)
    upload.write(b'{"prompt": "q", "completion": "a"}\n' * 2)
    upload.finish()
    with session_scope(url) as s:
        row, _ = files.store(s, upload)
        s.execute(
            update(DataFile)
            .where(col(DataFile.id) == row.id)
            .values(created_at=utcnow() - timedelta(days=days_old))
        )
        s.commit()
    return row.id


def _job(url: str, home: Path, dataset: str, status: JobStatus | None, *, days_old: float) -> str:
    with session_scope(url) as s:
        job = jobs.create_job(s, JobSpec.model_validate(recipe_spec(dataset)))
        if status is not None:
            assert jobs.claim(s, job.id, worker="w")
            jobs.add_metrics(s, job.id, [{"step": 1, "loss": 1.0}])
            jobs.finish(s, job.id, status, artifacts_dir=str(home / "jobs" / job.id))
            write_artifacts(home / "jobs" / job.id)
        stamp = utcnow() - timedelta(days=days_old)
        s.execute(
            update(Job)
            .where(col(Job.id) == job.id)
            .values(created_at=stamp, finished_at=stamp if status else None)
        )
        s.commit()
        return job.id


def test_dry_run_lists_and_sweep_removes_only_what_is_old_and_unused(
    sqlite_url: str, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    settings = Settings(_env_file=None, database_url=sqlite_url, home=home, retention_days=30)  # type: ignore[call-arg]
    unused = _upload(sqlite_url, home, "unused.jsonl", days_old=40)
    read_by_queued = _upload(sqlite_url, home, "queued.jsonl", days_old=40)
    read_by_new = _upload(sqlite_url, home, "new-job.jsonl", days_old=40)
    read_by_old = _upload(sqlite_url, home, "old-job.jsonl", days_old=40)
    fresh_file = _upload(sqlite_url, home, "fresh.jsonl", days_old=1)
    old_done = _job(sqlite_url, home, read_by_old, JobStatus.succeeded, days_old=31)
    old_failed = _job(sqlite_url, home, "sample:medical_qa", JobStatus.failed, days_old=60)
    old_queued = _job(sqlite_url, home, read_by_queued, None, days_old=90)
    new_done = _job(sqlite_url, home, read_by_new, JobStatus.cancelled, days_old=29)
    before = files_under(home)

    with session_scope(sqlite_url) as s:
        dry = retention.sweep(s, settings, days=30, dry_run=True)
    assert [j["id"] for j in dry.jobs] == [old_failed, old_done]  # oldest first
    assert sorted(f["id"] for f in dry.files) == sorted([unused, read_by_old])
    assert files_under(home) == before  # a dry run removes nothing

    done = sweep_once(settings)
    assert done is not None
    assert done.jobs == dry.jobs and done.files == dry.files
    gone = (f"jobs/{old_done}/", f"jobs/{old_failed}/", f"data/uploads/{unused}/")
    gone += (f"data/uploads/{read_by_old}/",)
    assert files_under(home) == {k: v for k, v in before.items() if not k.startswith(gone)}
    with session_scope(sqlite_url) as s:
        left = set(s.exec(select(Job.id)).all())
        assert left == {old_queued, new_done}
        assert {r.id for r in s.exec(select(DataFile)).all()} == {
            read_by_queued,
            read_by_new,
            fresh_file,
        }
        assert jobs.metrics_page(s, old_done, after_step=-1, limit=10)[0] == []
        assert jobs.get_job(s, new_done).status == JobStatus.cancelled
    with session_scope(sqlite_url) as s:  # a second sweep finds nothing more
        assert retention.sweep(s, settings, days=30).as_dict()["jobs"] == []


def test_retention_off_sweeps_nothing(sqlite_url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    _job(sqlite_url, home, "sample:medical_qa", JobStatus.succeeded, days_old=3650)
    settings = Settings(_env_file=None, database_url=sqlite_url, home=home)  # type: ignore[call-arg]
    before = files_under(home)
    assert settings.retention_days == 0
    assert sweep_once(settings) is None
    assert files_under(home) == before
