"""Postgres restarted while a job trains: the API answers 503 and recovers, the job loses nothing.

The job store is a private PostgreSQL cluster, stopped (fast shutdown: every open connection is
cut) while the worker is mid-training and started again a few seconds later. The API answers
503 problem+json (code database_unavailable) meanwhile and serves again afterwards by itself
(its pool pings connections before use); the worker's writes wait for the database
(core.store.db.connect_retry, MEDTUNE_DB_RETRY_S), so the job finishes with every step's metric
stored once.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from core.store.migrate import upgrade
from tests.conftest import Stack, free_port, start_api, start_worker, wait_healthy
from tests.e2e.private_services import (
    WAIT_S,
    PrivatePostgres,
    PrivateRedis,
    assert_ran_once,
    fault_env,
    job_rows,
    light_spec,
    wait_final,
    wait_for_line,
)
from tests.helpers import tiny_dataset, wait_steps

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]  # slow when the cores are busy

STEPS = 4
OUTAGE_S = 5


def _assert_database_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "database_unavailable"


def test_postgres_restart_mid_training(tmp_path: Path, model_cache: Path) -> None:
    with PrivateRedis() as broker, PrivatePostgres() as pg:
        db_url = pg.create_database()
        upgrade(db_url)
        # The reconciler stays out of the way (the lease renews every 100 s): the database
        # calls that meet the outage are the training run's own metric writes and cancel polls.
        env = fault_env(
            tmp_path,
            model_cache,
            database_url=db_url,
            broker_url=broker.url,
            reconcile_interval_s="3600",
        )
        port = free_port()
        stack = Stack(url=f"http://127.0.0.1:{port}", home=tmp_path)
        try:
            start_api(stack, port, env)
            start_worker(stack, "worker", env, queues="medtune.train")
            wait_healthy(stack)
            spec = light_spec(tiny_dataset(tmp_path / "tiny.jsonl"), max_steps=STEPS)
            with stack.client() as client:
                job_id = client.post("/jobs", json=spec).json()["id"]
                wait_steps(client, job_id, 1, WAIT_S)
                before = client.get(f"/jobs/{job_id}").json()
                assert before["status"] == "running" and before["steps_done"] < STEPS, before

                pg.stop()
                _assert_database_unavailable(client.get(f"/jobs/{job_id}"))
                _assert_database_unavailable(client.get("/healthz"))
                # Down until the training run has needed it (it writes or polls at each step),
                # however slow the steps are here.
                wait_for_line(stack.logs[1], "database unreachable")
                time.sleep(OUTAGE_S)  # a few more of its retries
                _assert_database_unavailable(client.get(f"/jobs/{job_id}/metrics"))
                pg.start()

                # The API serves again without a restart of its own.
                deadline = time.monotonic() + 15
                while (health := client.get("/healthz")).status_code != 200:
                    assert time.monotonic() < deadline, health.text
                    time.sleep(0.2)
                final = wait_final(client, job_id)
                assert final["status"] == "succeeded", stack.tail_logs() + str(final)
            assert_ran_once(job_rows(db_url, [job_id])[job_id], steps=STEPS)
        finally:
            stack.stop()
