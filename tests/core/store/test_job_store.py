"""The job store (core/store/jobs.py) on SQLite and on Postgres."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, update
from sqlmodel import Session, col, select

from core.errors import JobNotCancellable, JobNotFound
from core.spec import JobSpec
from core.store import jobs
from core.store.db import get_engine
from core.store.models import Job, JobStatus, MetricRow, Worker
from tests.helpers import recipe_spec

SPEC = JobSpec.model_validate(recipe_spec("sample:medical_qa"))


@pytest.fixture(params=["sqlite", "postgres"])
def session(request: pytest.FixtureRequest) -> Iterator[Session]:
    """A session on an empty, migrated job store.

    SQLite: a fresh file per test. Postgres: the session-wide database is shared, so each test
    runs inside one outer transaction that is rolled back at the end (core.store.jobs' commits
    become savepoint releases); the rows it deletes at the start are deleted only inside that
    transaction, and nothing a test writes is ever visible to, or left for, other tests.
    """
    if request.param == "sqlite":
        url = request.getfixturevalue("sqlite_url")
        with Session(get_engine(url), expire_on_commit=False) as s:
            yield s
        return
    url = request.getfixturevalue("migrated_pg")
    with get_engine(url).connect() as conn:
        outer = conn.begin()
        try:
            conn.execute(delete(MetricRow))
            conn.execute(delete(Job))
            with Session(
                bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False
            ) as s:
                yield s
        finally:
            outer.rollback()


def fresh(session: Session, job_id: str) -> dict[str, Any]:
    """The job row as stored now (not the identity map's copy)."""
    session.expire_all()
    return jobs.get_job(session, job_id).model_dump()


def finished_job(session: Session, status: JobStatus) -> Job:
    job = jobs.create_job(session, SPEC)
    if status == JobStatus.cancelled:
        jobs.request_cancel(session, job.id)
    else:
        assert jobs.claim(session, job.id, worker="w1")
        jobs.finish(session, job.id, status, error_code="boom" if status == "failed" else None)
    assert fresh(session, job.id)["status"] == status
    return job


def test_create_and_get(session: Session) -> None:
    job = jobs.create_job(session, SPEC)
    assert job.id.startswith("job_")
    got = fresh(session, job.id)
    assert got["status"] == JobStatus.queued
    assert got["base_model"] == "smollm2-135m-instruct"
    assert got["finetuned_model"] == "smollm2-medical-test"
    assert got["spec"] == SPEC.to_json()
    assert got["steps_done"] == 0 and got["cancel_requested"] is False
    assert got["started_at"] is None and got["finished_at"] is None and got["worker"] is None
    assert got["created_at"] is not None and got["notes"] == []
    # The stored spec is the recipe layout and validates back to the same spec.
    assert JobSpec.model_validate(got["spec"]) == SPEC


def test_get_unknown_job_is_job_not_found(session: Session) -> None:
    with pytest.raises(JobNotFound) as info:
        jobs.get_job(session, "job_doesnotexist")
    assert info.value.code == "job_not_found"
    assert info.value.status == 404
    assert info.value.field == "job_id"


def _page_through(session: Session, limit: int, status: str | None = None) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        page, cursor = jobs.list_jobs(session, limit=limit, cursor=cursor, status=status)
        pages.append([j.id for j in page])
        if cursor is None:
            return pages
        assert len(pages) < 100, "paging does not end"


def test_list_is_newest_first_with_cursor_paging(session: Session) -> None:
    ids = [jobs.create_job(session, SPEC).id for _ in range(25)]
    pages = _page_through(session, limit=10)
    assert [len(p) for p in pages] == [10, 10, 5]
    flat = [i for p in pages for i in p]
    assert flat == list(reversed(ids))  # newest first, no duplicate, no gap


def test_has_more_is_false_on_an_exactly_full_last_page(session: Session) -> None:
    ids = [jobs.create_job(session, SPEC).id for _ in range(6)]
    page, cursor = jobs.list_jobs(session, limit=3)
    assert cursor is not None
    page2, cursor2 = jobs.list_jobs(session, limit=3, cursor=cursor)
    assert cursor2 is None
    assert [j.id for j in page] + [j.id for j in page2] == list(reversed(ids))
    everything, last = jobs.list_jobs(session, limit=6)
    assert last is None and len(everything) == 6


def test_paging_is_exact_when_jobs_share_a_timestamp(session: Session) -> None:
    """Ties on created_at are broken by id, so page boundaries inside a tie lose nothing."""
    ids = [jobs.create_job(session, SPEC).id for _ in range(25)]
    base = datetime(2030, 1, 1, tzinfo=UTC)
    stamps = {job_id: base + timedelta(seconds=n // 5) for n, job_id in enumerate(ids)}
    for job_id, stamp in stamps.items():
        session.execute(update(Job).where(col(Job.id) == job_id).values(created_at=stamp))
    session.commit()
    expected = sorted(ids, key=lambda i: (stamps[i], i), reverse=True)
    for limit in (1, 3, 4, 7, 25, 100):
        pages = _page_through(session, limit=limit)
        flat = [i for p in pages for i in p]
        assert flat == expected, f"limit {limit}"
        assert all(len(p) == limit for p in pages[:-1])


def test_status_filter(session: Session) -> None:
    queued = [jobs.create_job(session, SPEC).id for _ in range(4)]
    running = [jobs.create_job(session, SPEC).id for _ in range(3)]
    for job_id in running:
        assert jobs.claim(session, job_id, worker="w")
    cancelled = jobs.create_job(session, SPEC).id
    jobs.request_cancel(session, cancelled)

    assert [i for p in _page_through(session, 2, "running") for i in p] == running[::-1]
    assert [i for p in _page_through(session, 2, "queued") for i in p] == queued[::-1]
    assert [i for p in _page_through(session, 2, "cancelled") for i in p] == [cancelled]
    assert _page_through(session, 2, "succeeded") == [[]]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage!",
        "a",
        _b64(b"no separator here"),
        _b64(b"not-a-date|job_123"),
        _b64(b"\xff\xfe\xfd|job"),
    ],
)
def test_invalid_cursor(session: Session, cursor: str) -> None:
    jobs.create_job(session, SPEC)
    with pytest.raises(jobs.InvalidCursor) as info:
        jobs.list_jobs(session, limit=5, cursor=cursor)
    assert info.value.code == "invalid_cursor"
    assert info.value.status == 400
    assert info.value.field == "cursor"


def test_cancel_of_a_queued_job_is_immediate(session: Session) -> None:
    job = jobs.create_job(session, SPEC)
    returned = jobs.request_cancel(session, job.id)
    assert returned.status == JobStatus.cancelled
    row = fresh(session, job.id)
    assert row["status"] == JobStatus.cancelled
    assert row["cancel_requested"] is True
    assert row["finished_at"] is not None
    # A cancelled job can no longer be claimed by a worker.
    assert not jobs.claim(session, job.id, worker="late")
    assert fresh(session, job.id)["status"] == JobStatus.cancelled


def test_cancel_of_a_running_job_is_requested_and_it_keeps_running(session: Session) -> None:
    job = jobs.create_job(session, SPEC)
    assert jobs.claim(session, job.id, worker="w1")
    assert not jobs.cancel_requested(session, job.id)
    returned = jobs.request_cancel(session, job.id)
    assert returned.status == JobStatus.running
    assert returned.cancel_requested is True
    row = fresh(session, job.id)
    assert row["status"] == JobStatus.running
    assert row["cancel_requested"] is True
    assert row["finished_at"] is None
    assert jobs.cancel_requested(session, job.id)
    # Asking twice is harmless.
    assert jobs.request_cancel(session, job.id).status == JobStatus.running


@pytest.mark.parametrize("status", [JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled])
def test_cancel_of_a_finished_job_is_refused_and_changes_nothing(
    session: Session, status: JobStatus
) -> None:
    job = finished_job(session, status)
    before = fresh(session, job.id)
    with pytest.raises(JobNotCancellable) as info:
        jobs.request_cancel(session, job.id)
    assert info.value.code == "job_not_cancellable"
    assert info.value.status == 409
    assert status.value in info.value.detail
    assert fresh(session, job.id) == before


def test_cancel_of_an_unknown_job_is_job_not_found(session: Session) -> None:
    with pytest.raises(JobNotFound):
        jobs.request_cancel(session, "job_nope")


def test_claim_is_exclusive(session: Session) -> None:
    job = jobs.create_job(session, SPEC)
    assert jobs.claim(session, job.id, worker="first") is True
    assert jobs.claim(session, job.id, worker="second") is False
    row = fresh(session, job.id)
    assert row["status"] == JobStatus.running
    assert row["worker"] == "first"
    assert row["started_at"] is not None


def test_claim_of_an_unknown_job_is_false(session: Session) -> None:
    assert jobs.claim(session, "job_nope", worker="w") is False


def test_finish_only_applies_to_a_running_job(session: Session) -> None:
    job = jobs.create_job(session, SPEC)
    jobs.finish(session, job.id, JobStatus.succeeded)
    assert fresh(session, job.id)["status"] == JobStatus.queued  # not running: no change
    assert jobs.claim(session, job.id, worker="w")
    jobs.finish(session, job.id, JobStatus.failed, error_code="oom", error_message="out of memory")
    row = fresh(session, job.id)
    assert (row["status"], row["error_code"], row["error_message"]) == (
        "failed",
        "oom",
        "out of memory",
    )
    assert row["finished_at"] is not None and row["stage"] is None


def _metrics(steps: range | list[int], loss: float = 1.0) -> list[dict[str, Any]]:
    return [{"step": s, "loss": loss + s, "learning_rate": 1e-4, "epoch": s / 10} for s in steps]


def _stored_steps(session: Session, job_id: str) -> list[tuple[int, float | None]]:
    session.expire_all()
    rows = session.exec(
        select(MetricRow).where(MetricRow.job_id == job_id).order_by(col(MetricRow.step))
    ).all()
    return [(r.step, r.loss) for r in rows]


def test_add_metrics_stores_rows_and_updates_steps_done(session: Session) -> None:
    job = jobs.create_job(session, SPEC)
    assert jobs.claim(session, job.id, worker="w")
    jobs.add_metrics(session, job.id, _metrics(range(1, 4)))
    assert _stored_steps(session, job.id) == [(1, 2.0), (2, 3.0), (3, 4.0)]
    assert fresh(session, job.id)["steps_done"] == 3
    jobs.add_metrics(session, job.id, [])
    assert fresh(session, job.id)["steps_done"] == 3


def test_add_metrics_skips_replayed_steps(session: Session) -> None:
    job = jobs.create_job(session, SPEC)
    assert jobs.claim(session, job.id, worker="w")
    jobs.add_metrics(session, job.id, _metrics(range(1, 4), loss=1.0))
    # A replay after a crash re-sends steps 2 and 3 (with other values) and a new step 4.
    jobs.add_metrics(session, job.id, _metrics([2, 3, 4], loss=100.0))
    assert _stored_steps(session, job.id) == [(1, 2.0), (2, 3.0), (3, 4.0), (4, 104.0)]
    assert fresh(session, job.id)["steps_done"] == 4
    # The same batch again changes nothing.
    jobs.add_metrics(session, job.id, _metrics([2, 3, 4], loss=100.0))
    assert len(_stored_steps(session, job.id)) == 4


def test_add_metrics_keeps_other_jobs_apart(session: Session) -> None:
    a, b = jobs.create_job(session, SPEC), jobs.create_job(session, SPEC)
    jobs.add_metrics(session, a.id, _metrics([1, 2]))
    jobs.add_metrics(session, b.id, _metrics([1]))
    assert [s for s, _ in _stored_steps(session, a.id)] == [1, 2]
    assert [s for s, _ in _stored_steps(session, b.id)] == [1]
    assert fresh(session, b.id)["steps_done"] == 1


def test_replaying_older_steps_does_not_move_progress_backwards(session: Session) -> None:
    job = jobs.create_job(session, SPEC)
    assert jobs.claim(session, job.id, worker="w")
    jobs.add_metrics(session, job.id, _metrics(range(1, 6)))
    jobs.add_metrics(session, job.id, _metrics([1, 2]))  # replay, all already stored
    assert len(_stored_steps(session, job.id)) == 5
    assert fresh(session, job.id)["steps_done"] == 5


def test_metrics_page(session: Session) -> None:
    job = jobs.create_job(session, SPEC)
    jobs.add_metrics(session, job.id, _metrics(range(1, 11)))

    rows, more = jobs.metrics_page(session, job.id, after_step=-1, limit=4)
    assert [r.step for r in rows] == [1, 2, 3, 4] and more
    rows, more = jobs.metrics_page(session, job.id, after_step=4, limit=4)
    assert [r.step for r in rows] == [5, 6, 7, 8] and more
    rows, more = jobs.metrics_page(session, job.id, after_step=8, limit=4)
    assert [r.step for r in rows] == [9, 10] and not more
    rows, more = jobs.metrics_page(session, job.id, after_step=6, limit=4)
    assert [r.step for r in rows] == [7, 8, 9, 10] and not more  # exactly full: no more
    rows, more = jobs.metrics_page(session, job.id, after_step=10, limit=4)
    assert list(rows) == [] and not more


def test_metrics_page_of_a_job_without_metrics_is_empty(session: Session) -> None:
    job = jobs.create_job(session, SPEC)
    rows, more = jobs.metrics_page(session, job.id, after_step=-1, limit=10)
    assert list(rows) == [] and more is False


def test_notes_and_set_fields(session: Session) -> None:
    job = jobs.create_job(session, SPEC)
    jobs.set_fields(session, job.id, stage="training")
    assert fresh(session, job.id)["stage"] is None  # only a running job's fields are set
    assert jobs.claim(session, job.id, worker="w")
    jobs.set_fields(session, job.id, stage="training", steps_total=12)
    jobs.add_note(session, job.id, "first")
    jobs.add_note(session, job.id, "second")
    row = fresh(session, job.id)
    assert (row["stage"], row["steps_total"]) == ("training", 12)
    assert row["notes"] == ["first", "second"]


def _running(session: Session, *, worker: str) -> str:
    job = jobs.create_job(session, JobSpec())
    assert jobs.claim(session, job.id, worker=worker, lease_s=300)
    return job.id


def test_a_restarted_worker_requeues_what_its_name_held(session: Session) -> None:
    mine, other = _running(session, worker="gpu0@h"), _running(session, worker="gpu1@h")
    assert jobs.requeue_held_by(session, "gpu0@h") == [mine]
    assert jobs.get_job(session, mine).status == JobStatus.queued
    assert jobs.get_job(session, mine).enqueued_at is None  # the reconciler sends it now
    assert jobs.get_job(session, other).status == JobStatus.running
    assert any("worker restarted" in n for n in jobs.get_job(session, mine).notes)


def test_jobs_of_a_worker_without_heartbeat_are_requeued_before_their_lease(
    session: Session,
) -> None:
    from core.routing import announce

    now = datetime.now(UTC)
    announce(session, name="dead@h", queue="medtune.train", gpu_name=None, gpu_memory_gib=None)
    announce(session, name="alive@h", queue="medtune.train", gpu_name=None, gpu_memory_gib=None)
    session.execute(
        update(Worker)
        .where(col(Worker.name) == "dead@h")
        .values(last_seen=now - timedelta(seconds=100))
    )
    session.commit()
    lost, alive = _running(session, worker="dead@h"), _running(session, worker="alive@h")
    assert jobs.requeue_lapsed(session) == []  # both leases run for 300 s more
    dead_before = now - timedelta(seconds=90)
    assert jobs.requeue_lapsed(session, workers_dead_before=dead_before) == [lost]
    assert jobs.get_job(session, alive).status == JobStatus.running


def test_a_resumed_job_keeps_its_first_start_and_logs_each_attempt(session: Session) -> None:
    job_id = _running(session, worker="w1")
    first = jobs.get_job(session, job_id).started_at
    assert jobs.requeue_held_by(session, "w1") == [job_id]
    assert jobs.claim(session, job_id, worker="w2")
    jobs.finish(session, job_id, JobStatus.succeeded, worker="w2")
    job = jobs.get_job(session, job_id)
    session.refresh(job)
    assert job.started_at == first and job.attempts == 2
    log = job.attempt_log or []
    assert [(a["attempt"], a["worker"], a["outcome"]) for a in log] == [
        (1, "w1", "worker restarted"),
        (2, "w2", "succeeded"),
    ]
    assert log[0]["ended_at"] <= log[1]["started_at"] <= log[1]["ended_at"]
