"""A worker whose lease lapsed (the job was requeued and taken by another) stops and writes
nothing more for the job: no second run ends it, fills its metrics or overwrites its adapter."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from core.errors import LeaseLost
from core.pipeline import run_job
from core.settings import Settings
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.lease import LeaseKeeper
from core.store.models import Job, JobStatus
from tests.helpers import recipe_spec, tiny_dataset


def _hand_over(url: str, job_id: str, *, to: str) -> None:
    """What the reconciler and a second worker do after a lease lapsed: requeue, then claim."""
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.status, job.worker = JobStatus.queued, None
        s.add(job)
        s.commit()
        assert jobs.claim(s, job_id, worker=to, lease_s=600)


def test_keeper_notices_the_job_was_taken_and_check_raises(sqlite_url: str) -> None:
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, JobSpec()).id
        assert jobs.claim(s, job_id, worker="w1", lease_s=60)
    with LeaseKeeper(sqlite_url, job_id, worker="w1", lease_s=0.3) as lease:
        time.sleep(0.25)
        assert not lease.lost.is_set()
        lease.check()  # still ours
        _hand_over(sqlite_url, job_id, to="w2")
        assert lease.lost.wait(2)
        with pytest.raises(LeaseLost):
            lease.check()


def test_finish_by_a_worker_that_no_longer_holds_the_job_changes_nothing(sqlite_url: str) -> None:
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, JobSpec()).id
        assert jobs.claim(s, job_id, worker="w1", lease_s=60)
    _hand_over(sqlite_url, job_id, to="w2")
    with session_scope(sqlite_url) as s:
        jobs.finish(s, job_id, JobStatus.failed, worker="w1", error_code="internal_error")
        job = jobs.get_job(s, job_id)
        assert (job.status, job.worker, job.error_code) == (JobStatus.running, "w2", None)
        jobs.finish(s, job_id, JobStatus.succeeded, worker="w2")
        assert jobs.get_job(s, job_id).status == JobStatus.succeeded


@pytest.mark.slow
def test_a_run_whose_job_was_taken_stops_and_leaves_it_alone(
    tmp_path: Path, sqlite_url: str, model_cache: Path
) -> None:
    data = tiny_dataset(tmp_path / "tiny.jsonl")
    spec = JobSpec.model_validate(recipe_spec(data, max_steps=40, logging_steps=1))
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, spec).id
    settings = Settings(
        home=tmp_path, database_url=sqlite_url, model_cache=model_cache, lease_seconds=1.5
    )
    result: dict[str, str] = {}
    runner = threading.Thread(
        target=lambda: result.update(status=run_job(job_id, settings, worker="w1"))
    )
    runner.start()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        with session_scope(sqlite_url) as s:
            if jobs.metrics_page(s, job_id, after_step=-1, limit=1)[0]:
                break
        time.sleep(0.5)
    _hand_over(sqlite_url, job_id, to="w2")
    with session_scope(sqlite_url) as s:
        before, _ = jobs.metrics_page(s, job_id, after_step=-1, limit=100)
    steps_at_takeover = {r.step for r in before}
    runner.join(timeout=600)

    assert result.get("status") == JobStatus.queued  # abandoned, not ended
    with session_scope(sqlite_url) as s:
        job = jobs.get_job(s, job_id)
        rows, _ = jobs.metrics_page(s, job_id, after_step=-1, limit=100)
    assert (job.status, job.worker, job.error_code, job.finished_at) == (
        JobStatus.running,
        "w2",
        None,
        None,
    )
    # Steps logged after the takeover never reach the store (a write that raced it may land
    # at most one batch late), and the run never got to its adapter.
    assert len({r.step for r in rows} - steps_at_takeover) <= 2
    assert max(r.step for r in rows) < 40
    assert not (tmp_path / "jobs" / job_id / "adapter").exists()
