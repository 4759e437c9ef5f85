"""The API process killed between committing a job and sending it to the broker: it still runs.

The API's broker is a socket that accepts connections and never answers, so POST /jobs commits
the job and then hangs inside the send. The test sees the committed row (queued, never stamped
as sent), SIGKILLs the API there, and starts a worker on a real Redis: its reconciler finds the
job the database says is queued but was never sent, sends it, and the job runs once.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import Stack, free_port, start_api, start_worker, wait_healthy
from tests.e2e.private_services import (
    PrivateRedis,
    assert_ran_once,
    fault_env,
    fresh_database,
    job_rows,
    light_spec,
    wait_final,
)
from tests.helpers import tiny_dataset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]  # slow when the cores are busy

STEPS = 2


@contextmanager
def silent_broker() -> Iterator[str]:
    """A Redis URL whose server completes TCP handshakes and never replies."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)  # never accept()ed: the kernel queues connections, nobody reads them
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


def _committed_job(db_url: str, timeout_s: float = 60) -> tuple[str, object]:
    libpq = db_url.replace("postgresql+psycopg://", "postgresql://", 1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with psycopg.connect(libpq) as conn:
            row = conn.execute("SELECT id, status, enqueued_at FROM jobs").fetchone()
        if row:
            assert row[1] == "queued", row
            return row[0], row[2]
        time.sleep(0.1)
    raise AssertionError("the API never committed the job")


def test_api_killed_between_commit_and_enqueue(tmp_path: Path, model_cache: Path) -> None:
    with PrivateRedis() as broker, fresh_database() as db_url, silent_broker() as dead_broker:
        api_env = fault_env(tmp_path, model_cache, database_url=db_url, broker_url=dead_broker)
        port = free_port()
        doomed = Stack(url=f"http://127.0.0.1:{port}", home=tmp_path)
        stack = Stack(url=f"http://127.0.0.1:{free_port()}", home=tmp_path)
        try:
            start_api(doomed, port, api_env)
            wait_healthy(doomed)
            spec = light_spec(tiny_dataset(tmp_path / "tiny.jsonl"), max_steps=STEPS)
            outcome: list[object] = []

            def submit() -> None:
                try:
                    outcome.append(httpx.post(f"{doomed.url}/jobs", json=spec, timeout=120))
                except httpx.HTTPError as exc:
                    outcome.append(exc)

            request = threading.Thread(target=submit, daemon=True)
            request.start()
            job_id, enqueued_at = _committed_job(db_url)
            time.sleep(1)  # the request is now stuck in the send, after the commit
            assert request.is_alive() and not outcome, outcome
            assert enqueued_at is None and job_rows(db_url, [job_id])[job_id]["enqueued_at"] is None
            doomed.procs[0].send_signal(signal.SIGKILL)
            doomed.procs[0].wait(timeout=10)
            request.join(timeout=30)
            assert outcome and isinstance(outcome[0], httpx.HTTPError), outcome  # no answer

            env = fault_env(
                tmp_path,
                model_cache,
                database_url=db_url,
                broker_url=broker.url,
                reconcile_interval_s="1",
            )
            start_api(stack, int(stack.url.rsplit(":", 1)[1]), env)
            start_worker(stack, "worker", env, queues="medtune.train")
            wait_healthy(stack)
            with stack.client() as client:
                final = wait_final(client, job_id)
            assert final["status"] == "succeeded", stack.tail_logs() + str(final)
            row = job_rows(db_url, [job_id])[job_id]
            assert row["enqueued_at"] is not None  # stamped by the reconciler's send
            assert_ran_once(row, steps=STEPS)
        finally:
            doomed.stop()
            stack.stop()
