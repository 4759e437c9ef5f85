"""JSON log lines (core/logs.py): the formatter, the job-id context, and the real API and worker
processes switched to JSON by MEDTUNE_LOG_FORMAT=json."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.logs import JsonFormatter, configure_from_env, job_context, job_id_var
from core.queue import RUN_JOB_TASK, TRAIN_QUEUE, make_celery
from core.settings import Settings
from core.store.db import session_scope
from core.store.migrate import upgrade
from core.store.models import Job, JobStatus
from tests.conftest import ROOT, free_port, stack_env


def record(msg: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("medtune.test", logging.INFO, __file__, 1, msg, args or None, None)
    rec.__dict__.update(extra)
    return rec


def formatted(rec: logging.LogRecord) -> dict:
    line = JsonFormatter().format(rec)
    assert "\n" not in line  # one record, one line
    return json.loads(line)


def test_a_line_is_one_json_object_with_job_id_null_outside_a_job() -> None:
    body = formatted(record("hello %s", "world"))
    assert body["message"] == "hello world"
    assert body["level"] == "INFO" and body["logger"] == "medtune.test"
    assert body["ts"].endswith("Z") and "T" in body["ts"]
    assert "job_id" in body and body["job_id"] is None


def test_job_context_tags_lines_and_restores_the_outer_job() -> None:
    with job_context("job_outer"):
        assert formatted(record())["job_id"] == "job_outer"
        with job_context("job_inner"):
            assert formatted(record())["job_id"] == "job_inner"
        assert formatted(record())["job_id"] == "job_outer"
    assert formatted(record())["job_id"] is None
    assert job_id_var.get() is None


def test_an_explicit_job_id_wins_over_the_context() -> None:
    with job_context("job_ctx"):
        assert formatted(record(job_id="job_explicit"))["job_id"] == "job_explicit"


def test_the_context_reaches_tasks_started_inside_it() -> None:
    async def log_line() -> dict:
        return formatted(record())

    async def main() -> dict:
        with job_context("job_async"):
            return await asyncio.create_task(log_line())

    assert asyncio.run(main())["job_id"] == "job_async"


def test_extras_are_kept_and_odd_values_stringified() -> None:
    body = formatted(record(step=3, where=Path("/tmp/x"), _private=1))
    assert body["step"] == 3 and body["where"] == "/tmp/x"
    assert "_private" not in body and "args" not in body and "msecs" not in body


def test_exceptions_stay_on_the_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        rec = record("failed")
        rec.exc_info = sys.exc_info()
    body = formatted(rec)
    assert body["message"] == "failed"
    assert "ValueError: boom" in body["exc_info"] and "Traceback" in body["exc_info"]


@pytest.fixture
def root_handler() -> Iterator[logging.Handler]:
    handler = logging.StreamHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    saved = {h: h.formatter for h in root.handlers}
    yield handler
    root.removeHandler(handler)
    for h, f in saved.items():
        h.setFormatter(f)


def test_configure_from_env_only_switches_on_json(
    monkeypatch: pytest.MonkeyPatch, root_handler: logging.Handler
) -> None:
    monkeypatch.delenv("MEDTUNE_LOG_FORMAT", raising=False)
    assert configure_from_env() is False
    assert not isinstance(root_handler.formatter, JsonFormatter)
    monkeypatch.setenv("MEDTUNE_LOG_FORMAT", "JSON")
    assert configure_from_env() is True
    assert isinstance(root_handler.formatter, JsonFormatter)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def wait_for(path: Path, needle: str, proc: subprocess.Popen, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace")
        if needle in text:
            return text
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"never saw {needle!r}:\n{path.read_text(errors='replace')[-4000:]}")


def test_worker_logs_json_with_the_job_id(tmp_path: Path) -> None:
    """A real Celery worker: its own lines are JSON, and a job's lines carry the job's id."""
    env = stack_env(tmp_path, tmp_path / "models", log_format="json")
    settings = Settings(_env_file=None, home=tmp_path)  # type: ignore[call-arg]
    settings.ensure_dirs()
    upgrade(settings.db_url)
    with session_scope(settings.db_url) as s:
        # Cancelled: the task only logs that it will not run it (no model is loaded).
        job = Job(base_model="b", finetuned_model="m", spec={}, status=JobStatus.cancelled)
        s.add(job)
        s.commit()
        job_id = job.id
    make_celery(settings).send_task(RUN_JOB_TASK, args=[job_id], queue=TRAIN_QUEUE)
    log = tmp_path / "worker.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool",
             "solo", "-Q", TRAIN_QUEUE, "-n", f"logs-{free_port()}@%h", "--loglevel", "INFO"],
            cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        text = wait_for(log, "not claimed", proc)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lines = json_lines(text)
    assert any(line["logger"] == "celery.apps.worker" for line in lines), text[-2000:]
    (ours,) = [line for line in lines if "not claimed" in line["message"]]
    assert ours["job_id"] == job_id and ours["logger"] == "core.pipeline"
    # Outside the job, the key is there and null.
    assert all("job_id" in line for line in lines)


def test_api_logs_json_under_uvicorn(tmp_path: Path) -> None:
    env = stack_env(tmp_path, tmp_path / "models", log_format="json")
    upgrade(f"sqlite:///{tmp_path / 'medtune.db'}")
    port = free_port()
    log = tmp_path / "api.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port)],
            cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(log, "Application startup complete", proc)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        text = wait_for(log, "/healthz", proc)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lines = json_lines(text)
    assert any(line["logger"] == "uvicorn.error" for line in lines), text
    (access,) = [line for line in lines if "/healthz" in line["message"]]
    assert access["logger"] == "uvicorn.access" and access["job_id"] is None
