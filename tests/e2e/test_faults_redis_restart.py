"""Redis restarted with its data gone while jobs wait in it: none is lost, none runs twice.

The broker is a private redis-server with persistence off, SIGKILLed and started again on the
same port, so every queued message it held is gone. The job store still says the jobs are
queued; the workers' reconciler sends them again (their ``enqueued_at`` stamp is older than
``resend_queued_after_s``), and a task claims its job in the database before it runs, so the
duplicates the reconciler sends meanwhile do nothing.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from core.queue import RUN_JOB_TASK, TRAIN_QUEUE, make_celery
from core.settings import Settings
from tests.conftest import Stack, free_port, start_api, start_worker, wait_healthy
from tests.e2e.private_services import (
    WAIT_S,
    PrivateRedis,
    assert_ran_once,
    fault_env,
    fresh_database,
    job_rows,
    light_spec,
    wait_final,
    wait_for_line,
)
from tests.helpers import tiny_dataset, wait_steps

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]  # slow when the cores are busy

JOBS = 2
STEPS = 2
LOSS_MARKER = "medtune-test:before-restart"


def queued_job_ids(broker: PrivateRedis) -> set[str]:
    """The job ids of the task messages waiting in Redis (Celery's protocol 2 body)."""
    messages = broker.client().lrange("medtune.train", 0, -1)
    bodies = [json.loads(base64.b64decode(json.loads(m)["body"])) for m in messages]
    return {args[0] for args, _kwargs, _embed in bodies}


def test_jobs_queued_in_a_redis_that_lost_its_data_all_run_once(
    tmp_path: Path, model_cache: Path
) -> None:
    with PrivateRedis() as broker, fresh_database() as db_url:
        env = fault_env(
            tmp_path,
            model_cache,
            database_url=db_url,
            broker_url=broker.url,
            reconcile_interval_s="1",
            resend_queued_after_s="3",
        )
        port = free_port()
        stack = Stack(url=f"http://127.0.0.1:{port}", home=tmp_path)
        try:
            start_api(stack, port, env)
            start_worker(stack, "worker", env, queues="medtune.train")
            wait_healthy(stack)
            spec = light_spec(tiny_dataset(tmp_path / "tiny.jsonl"), max_steps=STEPS)
            with stack.client() as client:
                ids = [client.post("/jobs", json=spec).json()["id"] for _ in range(JOBS)]
                # The first job runs (its message taken, unacked); the others wait in Redis.
                wait_steps(client, ids[0], 1, WAIT_S)
                assert queued_job_ids(broker) == set(ids[1:])
                rows = job_rows(db_url, ids)
                assert all(rows[i]["status"] == "queued" for i in ids[1:]), rows
                assert all(r["enqueued_at"] is not None for r in rows.values()), rows

                # A key nobody else writes proves the data went: the worker and the API
                # reconnect at once and write their own keys, so the key count can't show it.
                broker.client().set(LOSS_MARKER, 1)
                broker.restart_empty()
                assert not broker.client().exists(LOSS_MARKER)

                for job_id in ids:
                    final = wait_final(client, job_id)
                    assert final["status"] == "succeeded", stack.tail_logs() + str(final)
            # A duplicate delivery (the reconciler resends waiting jobs every few seconds; how
            # many reach the worker before its claim depends on timing) is refused by the
            # claim: one is sent here, so the refusal is seen whatever the timing was.
            app = make_celery(Settings(home=tmp_path, broker_url=broker.url, database_url=db_url))
            app.send_task(RUN_JOB_TASK, args=[ids[0]], queue=TRAIN_QUEUE)
            wait_for_line(stack.logs[1], f"job {ids[0]} not claimed (status")
            rows = job_rows(db_url, ids)
            for job_id in ids:
                assert_ran_once(rows[job_id], steps=STEPS)
        finally:
            stack.stop()
