"""A training worker killed with its whole process group: a worker restarted under the same name
resumes its job at once, and a worker of another name takes it over within a few heartbeats,
both long before the job's lease would have lapsed. The resumed job keeps its first start time
and records each attempt."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from cli.main import worker_command
from tests.conftest import (
    ROOT,
    Stack,
    claim_redis_db,
    free_port,
    stack_env,
    start_api,
    wait_healthy,
)
from tests.helpers import recipe_spec, tiny_dataset, wait_status, wait_steps

pytestmark = pytest.mark.slow
LEASE_S = 300  # the default: a lost job used to wait this long to be requeued


@pytest.fixture
def private_redis_url() -> Iterator[str]:
    """A Redis database of its own: the session's shared worker must not take this job."""
    url = claim_redis_db()
    yield url
    redis.Redis.from_url(url).flushdb()


def start_group_worker(stack: Stack, name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A training worker in a process group of its own, so the test can kill the whole group."""
    log = stack.home / f"{name}-{len(stack.logs)}.log"
    stack.logs.append(log)
    proc = subprocess.Popen(
        worker_command("medtune.train", name),
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    stack.procs.append(proc)
    return proc


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # no warm shutdown, no ack, nothing left running
    proc.wait(timeout=10)


def wait_attempt(client: httpx.Client, job_id: str, attempt: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if job["attempts"] >= attempt and job["status"] != "queued":
            return
        assert time.monotonic() < deadline, f"attempt {attempt} did not start: {job}"
        time.sleep(0.3)


def run_and_kill(
    stack: Stack, env: dict[str, str], tmp_path: Path, name: str
) -> tuple[Any, dict[str, Any]]:
    first = start_group_worker(stack, name, env)
    wait_healthy(stack)  # the API, started just before: the worker starts meanwhile
    data = tiny_dataset(tmp_path / "tiny.jsonl")
    client = stack.client()
    job = client.post("/jobs", json=recipe_spec(data, max_steps=8, save_steps=3)).json()
    try:
        wait_steps(client, job["id"], 4)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.tail_logs()}") from None
    running = client.get(f"/jobs/{job['id']}").json()
    kill_group(first)
    return client, running


def check_resumed(client: httpx.Client, job_id: str, running: dict[str, Any], why: str) -> None:
    final = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 300)
    assert final["status"] == "succeeded", final
    assert final["started_at"] == running["started_at"]  # the first attempt's start
    log = final["attempt_log"]
    assert [a["attempt"] for a in log] == [1, 2] and final["attempts"] == 2
    assert log[0]["outcome"] == why and log[1]["outcome"] == "succeeded"
    assert log[0]["started_at"] < log[1]["started_at"] <= log[1]["ended_at"]
    notes = " | ".join(final["notes"])
    assert why in notes and "resumed from checkpoint-3" in notes, notes


def test_a_worker_restarted_under_its_name_resumes_its_job_at_once(
    tmp_path: Path, migrated_pg: str, private_redis_url: str, model_cache: Path
) -> None:
    # Heartbeats every 120 s: only the restart can requeue the job before the lease ends.
    env = stack_env(
        tmp_path,
        model_cache,
        database_url=migrated_pg,
        broker_url=private_redis_url,
        reconcile_interval_s="120",
    )
    port = free_port()
    stack = Stack(url=f"http://127.0.0.1:{port}", home=tmp_path)
    start_api(stack, port, env)
    try:
        name = f"crashy-{port}"  # unique: a worker's start reclaims what its name holds
        client, running = run_and_kill(stack, env, tmp_path, name)
        killed = time.monotonic()
        start_group_worker(stack, name, env)  # the same node name
        wait_attempt(client, running["id"], 2, timeout_s=LEASE_S / 2)
        assert time.monotonic() - killed < LEASE_S / 2, stack.tail_logs()
        check_resumed(client, running["id"], running, "worker restarted")
    finally:
        stack.stop()


def test_another_worker_takes_over_within_a_few_heartbeats(
    tmp_path: Path, migrated_pg: str, private_redis_url: str, model_cache: Path
) -> None:
    env = stack_env(
        tmp_path,
        model_cache,
        database_url=migrated_pg,
        broker_url=private_redis_url,
        reconcile_interval_s="2",  # dead after 3 missed beats: 6 s
    )
    port = free_port()
    stack = Stack(url=f"http://127.0.0.1:{port}", home=tmp_path)
    start_api(stack, port, env)
    try:
        client, running = run_and_kill(stack, env, tmp_path, f"crashy-{port}")
        killed = time.monotonic()
        start_group_worker(stack, f"survivor-{port}", env)  # another name: nothing to reclaim
        wait_attempt(client, running["id"], 2, timeout_s=LEASE_S / 2)
        assert time.monotonic() - killed < LEASE_S / 2, stack.tail_logs()
        check_resumed(client, running["id"], running, "worker lost")
        final = client.get(f"/jobs/{running['id']}").json()
        assert final["attempt_log"][1]["worker"].startswith(f"survivor-{port}@")
    finally:
        stack.stop()
