"""The HTTP API in-process, shared by the API tests: a migrated SQLite job store and a fake
queue that records what the API sends and answers inference tasks, no broker or worker."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from api.deps import get_queue
from api.main import create_app
from core.inference.stream import Channel, channel_for
from core.settings import Settings, get_settings
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from tests.helpers import recipe_spec

PROBLEM = "application/problem+json"


@dataclass
class SentTask:
    name: str
    args: list[Any] | None
    kwargs: dict[str, Any] | None
    options: dict[str, Any]


class FakeResult:
    def __init__(self, reply: dict[str, Any]) -> None:
        self.reply = reply
        self.revoked = False

    def get(self, timeout: float | None = None) -> dict[str, Any]:
        return self.reply

    def revoke(self) -> None:
        self.revoked = True


@dataclass
class FakeQueue:
    """Records what the API sends; answers inference tasks with ``reply``: on the task's stream
    when it names one (as the worker does; ``channel`` is set by the app's builder), else as the
    task's result."""

    calls: list[SentTask] = field(default_factory=list)
    channel: Channel | None = None
    reply: dict[str, Any] = field(
        default_factory=lambda: {
            "answer": "Rest and fluids.",
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24},
            "generation_seconds": 0.1,
            "tokens_per_second": 40.0,
        }
    )

    def send_task(
        self,
        name: str,
        args: list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> FakeResult:
        self.calls.append(SentTask(name, args, kwargs, options))
        return self.answer(kwargs, self.reply)

    def answer(self, kwargs: dict[str, Any] | None, reply: dict[str, Any]) -> FakeResult:
        stream_id = (kwargs or {}).get("stream_id")
        if stream_id:
            assert self.channel is not None, "the app's builder gives the queue its channel"
            if "error" in reply:
                self.channel.publish(stream_id, {"type": "error", "error": reply["error"]})
            else:
                self.channel.publish(stream_id, {"type": "done", "result": reply})
        return FakeResult(reply)


@dataclass
class Api:
    client: TestClient
    queue: FakeQueue
    db_url: str

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every stored row, read straight from the SQLite file."""
        path = make_url(self.db_url).database
        assert path
        with sqlite3.connect(path) as conn:
            return {
                table: conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                for table in ("jobs", "job_metrics")
            }

    def create(self, **training: Any) -> dict[str, Any]:
        response = self.client.post("/jobs", json=recipe_spec("sample:medical_qa", **training))
        assert response.status_code == 201, response.text
        return response.json()


def make_client(db_url: str, home: Path, queue: FakeQueue) -> TestClient:
    """The API with authentication off: tests/api/test_auth.py covers keys."""
    app = create_app()
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, database_url=db_url, home=home, auth="disabled"
    )
    app.dependency_overrides[get_settings] = lambda: settings
    app.dependency_overrides[get_queue] = lambda: queue
    queue.channel = channel_for(settings)
    return TestClient(app, raise_server_exceptions=True)


@pytest.fixture
def api(sqlite_url: str, tmp_path: Path) -> Iterator[Api]:
    queue = FakeQueue()
    with make_client(sqlite_url, tmp_path / "home", queue) as client:
        yield Api(client=client, queue=queue, db_url=sqlite_url)


@pytest.fixture
def seeded(api: Api) -> dict[str, str]:
    """A queued job, and a succeeded one with five metric rows; the queue log is then cleared."""
    queued = api.create()["id"]
    finished = api.create()["id"]
    with session_scope(api.db_url) as s:
        assert jobs.claim(s, finished, worker="test")
        jobs.add_metrics(
            s, finished, [{"step": n, "loss": 2.0 / n, "learning_rate": 1e-4} for n in range(1, 6)]
        )
        jobs.finish(s, finished, JobStatus.succeeded)
    api.queue.calls.clear()
    return {"queued": queued, "finished": finished}


def assert_problem(response: Any, status: int, code: str, field: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"].endswith("/" + code)
    assert body["detail"]
    if field is not None:
        assert body.get("field") == field, body
    return body
