"""`medtune up` on the embedded defaults: SQLite job store and a SQLite broker, no server."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from core.store.migrate import alembic_config
from tests.conftest import Stack, free_port, stack_env, start, wait_healthy
from tests.helpers import recipe_spec, tiny_dataset, wait_status

pytestmark = pytest.mark.slow


def test_up_runs_a_job_and_answers_on_embedded_defaults(tmp_path: Path, model_cache: Path) -> None:
    port = free_port()
    stack = Stack(url=f"http://127.0.0.1:{port}", home=tmp_path)
    start(
        stack,
        "up",
        [sys.executable, "-m", "cli.main", "up", "--port", str(port)],
        stack_env(tmp_path, model_cache),
    )
    try:
        wait_healthy(stack, timeout_s=120)
        data = tiny_dataset(tmp_path / "tiny.jsonl", rows=4)
        with stack.client() as client:
            job = client.post("/jobs", json=recipe_spec(data, max_steps=2)).json()
            final = wait_status(client, job["id"], {"succeeded", "failed", "cancelled"})
            assert final["status"] == "succeeded", stack.tail_logs() + str(final)
            reply = client.post(
                "/infer",
                json={"job_id": job["id"], "max_new_tokens": 16, "question": "What is a fever?"},
            )
            assert reply.status_code == 200, reply.text + stack.tail_logs()
            assert reply.json()["answer"]
    finally:
        stack.stop()
    # Everything lived in SQLite files under MEDTUNE_HOME, migrated by `up` itself.
    with sqlite3.connect(tmp_path / "medtune.db") as db:
        head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
        assert db.execute("SELECT version_num FROM alembic_version").fetchone() == (head,)
        assert db.execute("SELECT status FROM jobs").fetchall() == [("succeeded",)]
    assert (tmp_path / "broker.db").is_file()
    assert all(p.returncode is not None for p in stack.procs)
