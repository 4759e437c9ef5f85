"""/metrics: Prometheus exposition of the job store, the broker's queues and the HTTP API.

Job and queue figures are read at scrape time (the database is the truth, and any number of API
processes then agree); HTTP counters are per process, so run one uvicorn process per container
(as Dockerfile.api does) or scrape each process.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import Engine, create_engine, func, text
from sqlmodel import Session, col, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import PrincipalDep, SessionDep, SettingsDep
from core.auth import Forbidden
from core.queue import INFER_QUEUE, TRAIN_QUEUE
from core.settings import Settings
from core.store.models import Job, JobStatus, MetricRow

router = APIRouter(tags=["observability"])

QUEUES = (TRAIN_QUEUE, INFER_QUEUE)
# Kombu's Redis transport keeps a priority's messages in "<queue>\x06\x16<priority>" lists.
_REDIS_PRIORITY_SEP = "\x06\x16"
_REDIS_PRIORITY_STEPS = (0, 3, 6, 9)
# Running jobs are few (one per worker); the cap keeps a scrape cheap whatever happens.
_MAX_RUNNING = 200

# The process's own registry, not prometheus_client's global one: building the app twice (the
# tests do) must not register a metric name twice.
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
HTTP_REQUESTS = Counter(
    "medtune_http_requests",
    "HTTP requests answered, by route template and status code.",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "medtune_http_request_duration_seconds",
    "Seconds from a request to its response's headers (an event stream counts to its start).",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)


class PrometheusMiddleware:
    """Counts requests and times them to their first response message.

    A plain ASGI middleware (not BaseHTTPMiddleware), so event streams are passed through
    untouched. The route label is the matched template (``/jobs/{job_id}``), never the raw path,
    and ``unmatched`` for a path with no route: label values stay few whatever clients send.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                HTTP_LATENCY.labels(scope["method"], _route(scope)).observe(
                    time.perf_counter() - started
                )
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            HTTP_REQUESTS.labels(scope["method"], _route(scope), str(status)).inc()


def _route(scope: Scope) -> str:
    # The router writes the matched route into the request's scope, which is this same dict.
    route = scope.get("route")
    return str(getattr(route, "path", None) or "unmatched")


class _Snapshot:
    """A collector that hands out metric families computed for this scrape."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def _utc(stamp: datetime) -> datetime:
    # SQLite hands back naive datetimes; every stamp we store is UTC.
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def job_families(session: Session) -> list[Metric]:
    """Jobs by status, and the latest training figures of each running job."""
    counts = dict(
        session.exec(select(Job.status, func.count()).group_by(Job.status)).all()  # type: ignore[call-overload]
    )
    jobs = GaugeMetricFamily("medtune_jobs", "Jobs in the store, by status.", labels=["status"])
    for status in JobStatus:
        jobs.add_metric([status.value], counts.get(status.value, 0))

    labels = ["job_id"]
    steps = GaugeMetricFamily("medtune_job_steps_done", "Optimizer steps done.", labels=labels)
    total = GaugeMetricFamily("medtune_job_steps_total", "Optimizer steps planned.", labels=labels)
    step_time = GaugeMetricFamily(
        "medtune_job_step_seconds",
        "Seconds per step between the job's latest two metric rows.",
        labels=labels,
    )
    tokens = GaugeMetricFamily(
        "medtune_job_tokens_per_second", "Trained tokens/s in the latest metric row.", labels=labels
    )
    loss = GaugeMetricFamily("medtune_job_loss", "Loss in the latest metric row.", labels=labels)
    memory = GaugeMetricFamily(
        "medtune_job_peak_memory_bytes",
        "Peak memory of the training process in the latest metric row: GPU memory on a CUDA "
        "worker, resident set on a CPU worker.",
        labels=labels,
    )
    last_row = GaugeMetricFamily(
        "medtune_job_last_metric_timestamp_seconds",
        "Unix time of the job's latest metric row (a stalled job stops moving it).",
        labels=labels,
    )
    running = session.exec(
        select(Job)
        .where(Job.status == JobStatus.running)
        .order_by(col(Job.created_at))
        .limit(_MAX_RUNNING)
    ).all()
    for job in running:
        steps.add_metric([job.id], job.steps_done)
        if job.steps_total:
            total.add_metric([job.id], job.steps_total)
        latest = session.exec(
            select(MetricRow)
            .where(MetricRow.job_id == job.id)
            .order_by(col(MetricRow.step).desc())
            .limit(2)
        ).all()
        if not latest:
            continue
        row = latest[0]
        last_row.add_metric([job.id], _utc(row.created_at).timestamp())
        if row.tokens_per_second is not None:
            tokens.add_metric([job.id], row.tokens_per_second)
        if row.loss is not None:
            loss.add_metric([job.id], row.loss)
        if row.peak_memory_mb is not None:
            memory.add_metric([job.id], row.peak_memory_mb * 2**20)
        if len(latest) == 2 and row.step > latest[1].step:
            seconds = (_utc(row.created_at) - _utc(latest[1].created_at)).total_seconds()
            step_time.add_metric([job.id], max(seconds, 0.0) / (row.step - latest[1].step))
    return [jobs, steps, total, step_time, tokens, loss, memory, last_row]


@lru_cache(maxsize=8)
def _redis(url: str) -> Any:
    import redis

    # Short timeouts: a scrape must answer even when the broker does not.
    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)


@lru_cache(maxsize=8)
def _broker_engine(url: str) -> Engine:
    return create_engine(url)


def redis_depths(url: str) -> dict[str, int]:
    client = _redis(url)
    pipe = client.pipeline()
    for queue in QUEUES:
        for priority in _REDIS_PRIORITY_STEPS:
            pipe.llen(f"{queue}{_REDIS_PRIORITY_SEP}{priority}" if priority else queue)
    sizes = pipe.execute()
    n = len(_REDIS_PRIORITY_STEPS)
    return {queue: int(sum(sizes[i * n : (i + 1) * n])) for i, queue in enumerate(QUEUES)}


def sql_depths(url: str) -> dict[str, int]:
    """Visible (not yet delivered) messages in Kombu's SQL transport tables."""
    engine = _broker_engine(url)
    depths = dict.fromkeys(QUEUES, 0)
    with engine.connect() as conn:
        tables = set(engine.dialect.get_table_names(conn))
        if not {"kombu_queue", "kombu_message"} <= tables:
            return depths  # no message was ever sent through this broker
        rows = conn.execute(
            text(
                "SELECT q.name, COUNT(m.id) FROM kombu_message m "
                "JOIN kombu_queue q ON m.queue_id = q.id "
                "WHERE m.visible = :visible GROUP BY q.name"
            ),
            {"visible": True},
        )
        for name, count in rows:
            if name in depths:
                depths[name] = int(count)
    return depths


def queue_families(settings: Settings) -> list[Metric]:
    """Messages waiting in each Celery queue (delivered, running tasks are not counted)."""
    url = settings.celery_broker_url
    if url.startswith(("redis://", "rediss://")):
        read = redis_depths
    elif url.startswith("sqla+"):
        read, url = sql_depths, url.removeprefix("sqla+")
    else:
        # Other brokers (memory://, amqp://): nothing cheap and reliable to count from here.
        return []
    up = GaugeMetricFamily("medtune_broker_up", "1 if the broker answered this scrape.")
    depth = GaugeMetricFamily(
        "medtune_queue_depth", "Messages waiting in a Celery queue.", labels=["queue"]
    )
    try:
        depths = read(url)
    except Exception:  # a broker that is down is a reading, not a failed scrape
        up.add_metric([], 0)
        return [up]
    up.add_metric([], 1)
    for queue, size in depths.items():
        depth.add_metric([queue], size)
    return [up, depth]


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(session: SessionDep, settings: SettingsDep, principal: PrincipalDep) -> Response:
    """Prometheus metrics: jobs by status, queue depth, running jobs' speed, HTTP traffic."""
    if not principal.admin:
        # Every job's id and figures are here, whoever owns it.
        raise Forbidden("/metrics needs an admin key (medtune keys create --admin)")
    scrape = CollectorRegistry()
    scrape.register(_Snapshot(job_families(session) + queue_families(settings)))
    body = generate_latest(REGISTRY) + generate_latest(scrape)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
