"""A job that outlives the broker's visibility timeout is handed out again, and runs only once.

Redis's transport gives an unacknowledged task to another consumer once its visibility timeout
has passed (a worker on a long job acknowledges only at the end: acks_late). The test sets the
timeout to 2 s (MEDTUNE_VISIBILITY_TIMEOUT_S, with sweeps as often) and runs two idle workers:
one takes the job and trains far longer than that; the other gets the same task again. Its
claim in the job store refuses it, so the copy ends at once without failing or restarting the
job, and the job succeeds once.
"""

from __future__ import annotations

from pathlib import Path

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
    wait_for_line,
)
from tests.helpers import tiny_dataset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]  # slow when the cores are busy

STEPS = 4
REFUSED = "not claimed (status running)"


def test_redelivery_after_the_visibility_timeout_is_refused(
    tmp_path: Path, model_cache: Path
) -> None:
    with PrivateRedis() as broker, fresh_database() as db_url:
        env = fault_env(
            tmp_path,
            model_cache,
            database_url=db_url,
            broker_url=broker.url,
            visibility_timeout_s="2",
        )
        port = free_port()
        stack = Stack(url=f"http://127.0.0.1:{port}", home=tmp_path)
        try:
            start_api(stack, port, env)
            start_worker(stack, "one", env, queues="medtune.train")
            start_worker(stack, "two", env, queues="medtune.train")
            wait_healthy(stack)
            for log in stack.logs[1:]:
                wait_for_line(log, "ready.")  # both idle: either may take the job
            spec = light_spec(tiny_dataset(tmp_path / "tiny.jsonl"), max_steps=STEPS)
            with stack.client() as client:
                job_id = client.post("/jobs", json=spec).json()["id"]
                final = wait_final(client, job_id)
            assert final["status"] == "succeeded", stack.tail_logs() + str(final)
            row = job_rows(db_url, [job_id])[job_id]
            assert_ran_once(row, steps=STEPS)
            assert not any("resumed" in n for n in row["notes"]), row["notes"]
            logs = {log.name: log.read_text(errors="replace") for log in stack.logs[1:]}
            ran = next(name for name in logs if row["worker"].startswith(name.split(".")[0]))
            (idle,) = set(logs) - {ran}
            # The idle worker got the task again while the job trained, and let it be.
            assert REFUSED in logs[idle], stack.tail_logs()
            assert "succeeded in" in logs[idle] and "'running'" in logs[idle], logs[idle]
            assert REFUSED not in logs[ran]
        finally:
            stack.stop()
