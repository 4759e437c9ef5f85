"""GET /metrics in-process: a migrated SQLite job store, real Kombu SQL and Redis brokers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.deps import get_queue
from api.main import create_app
from core.queue import INFER_QUEUE, RUN_JOB_TASK, TRAIN_QUEUE, make_celery
from core.settings import Settings, get_settings
from core.store.db import session_scope
from core.store.models import Job, JobStatus, MetricRow
from tests.conftest import claim_redis_db, free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class NoQueue:
    def send_task(self, *args: Any, **kwargs: Any) -> None:
        return None


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def make_client(sqlite_url: str, tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """A TestClient on the migrated store; ``broker_url`` picks the broker /metrics reads."""
    clients: list[TestClient] = []

    def make(broker_url: str | None = None) -> TestClient:
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None, database_url=sqlite_url, home=tmp_path / "home", broker_url=broker_url
        )
        settings.ensure_dirs()
        app = create_app()
        app.dependency_overrides[get_settings] = lambda: settings
        app.dependency_overrides[get_queue] = lambda: NoQueue()
        client = TestClient(app)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def add_job(db_url: str, status: JobStatus, **fields: Any) -> str:
    with session_scope(db_url) as s:
        job = Job(
            base_model="smollm2-135m-instruct",
            finetuned_model="m",
            spec={},
            status=status,
            **fields,
        )
        s.add(job)
        s.commit()
        return job.id


def add_rows(db_url: str, job_id: str, rows: list[dict[str, Any]]) -> None:
    with session_scope(db_url) as s:
        for row in rows:
            s.add(MetricRow(job_id=job_id, **row))
        s.commit()


def test_jobs_by_status_and_running_jobs_latest_figures(
    make_client: Callable[..., TestClient], sqlite_url: str
) -> None:
    for _ in range(2):
        add_job(sqlite_url, JobStatus.queued)
    done = add_job(sqlite_url, JobStatus.succeeded, steps_done=3, steps_total=3)
    add_job(sqlite_url, JobStatus.failed)
    busy = add_job(sqlite_url, JobStatus.running, steps_done=5, steps_total=10)
    fresh = add_job(sqlite_url, JobStatus.running, steps_done=0)
    t0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    add_rows(
        sqlite_url,
        busy,
        [
            # Logged every 2 steps; step time comes from the latest two rows only: 6 s / 2 steps.
            {"step": 1, "loss": 2.0, "created_at": t0 - timedelta(seconds=100)},
            {"step": 3, "loss": 1.8, "tokens_per_second": 100.0, "created_at": t0},
            {
                "step": 5,
                "loss": 1.5,
                "tokens_per_second": 250.0,
                "peak_memory_mb": 1024.0,
                "created_at": t0 + timedelta(seconds=6),
            },
        ],
    )
    add_rows(sqlite_url, done, [{"step": 3, "loss": 0.5, "tokens_per_second": 9.0}])

    samples = scrape(make_client())

    expected = {"queued": 2, "running": 2, "succeeded": 1, "failed": 1, "cancelled": 0}
    for status, count in expected.items():
        assert sample(samples, "medtune_jobs", status=status) == count, status
    assert sample(samples, "medtune_job_steps_done", job_id=busy) == 5
    assert sample(samples, "medtune_job_steps_total", job_id=busy) == 10
    assert sample(samples, "medtune_job_step_seconds", job_id=busy) == pytest.approx(3.0)
    assert sample(samples, "medtune_job_tokens_per_second", job_id=busy) == 250.0
    assert sample(samples, "medtune_job_loss", job_id=busy) == 1.5
    assert sample(samples, "medtune_job_peak_memory_bytes", job_id=busy) == 1024 * 2**20
    assert sample(samples, "medtune_job_last_metric_timestamp_seconds", job_id=busy) == (
        (t0 + timedelta(seconds=6)).timestamp()
    )
    # A running job with no metric row yet has progress but no speed; finished jobs have none.
    assert sample(samples, "medtune_job_steps_done", job_id=fresh) == 0
    assert sample(samples, "medtune_job_step_seconds", job_id=fresh) is None
    assert not [key for key in samples if dict(key[1]).get("job_id") == done]


def test_queue_depth_counts_waiting_messages_in_the_sql_broker(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    client = make_client()  # the embedded default: Kombu's SQL transport in home/broker.db
    samples = scrape(client)
    assert sample(samples, "medtune_broker_up") == 1
    assert sample(samples, "medtune_queue_depth", queue=TRAIN_QUEUE) == 0

    # Real messages, sent the way the API sends them, into the broker the settings name.
    settings = Settings(_env_file=None, home=tmp_path / "home")  # type: ignore[call-arg]
    sender = make_celery(settings)
    for n in range(3):
        sender.send_task(RUN_JOB_TASK, args=[f"job_{n}"], queue=TRAIN_QUEUE)
    sender.send_task("medtune.infer", args=["job_0", []], queue=INFER_QUEUE)

    samples = scrape(client)
    assert sample(samples, "medtune_queue_depth", queue=TRAIN_QUEUE) == 3
    assert sample(samples, "medtune_queue_depth", queue=INFER_QUEUE) == 1


def test_queue_depth_reads_the_redis_lists_priorities_included(
    make_client: Callable[..., TestClient],
) -> None:
    # A Redis database of its own: no live worker may consume these queues meanwhile.
    queue_redis_url = claim_redis_db()
    r = redis.Redis.from_url(queue_redis_url)
    r.flushdb()
    try:
        r.rpush(TRAIN_QUEUE, "a", "b")
        r.rpush(f"{TRAIN_QUEUE}\x06\x163", "c")  # Kombu's list for priority 3
        r.rpush(INFER_QUEUE, "d")
        r.rpush("some.other.queue", "e")
        samples = scrape(make_client(queue_redis_url))
    finally:
        r.flushdb()
    assert sample(samples, "medtune_broker_up") == 1
    assert sample(samples, "medtune_queue_depth", queue=TRAIN_QUEUE) == 3
    assert sample(samples, "medtune_queue_depth", queue=INFER_QUEUE) == 1


def test_a_broker_that_is_down_is_reported_not_an_error(
    make_client: Callable[..., TestClient],
) -> None:
    samples = scrape(make_client(f"redis://127.0.0.1:{free_port()}/0"))
    assert sample(samples, "medtune_broker_up") == 0
    assert not [key for key in samples if key[0] == "medtune_queue_depth"]
    assert sample(samples, "medtune_jobs", status="queued") == 0


def test_http_requests_are_counted_by_route_template(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client()
    before = scrape(client)
    client.get("/healthz")
    client.get("/jobs/job_a")
    client.get("/jobs/job_b")
    client.get("/no/such/path/12345")
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return (sample(after, name, **labels) or 0) - (sample(before, name, **labels) or 0)

    total = "medtune_http_requests_total"
    assert delta(total, method="GET", route="/healthz", status="200") == 1
    # Two ids, one series: the label is the route template, never the raw path.
    assert delta(total, method="GET", route="/jobs/{job_id}", status="404") == 2
    assert delta(total, method="GET", route="unmatched", status="404") == 1
    assert not [k for k in after if "job_a" in str(k) or "12345" in str(k)]
    count = "medtune_http_request_duration_seconds_count"
    assert delta(count, method="GET", route="/jobs/{job_id}") == 2
