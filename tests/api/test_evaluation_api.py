"""GET /jobs/{id}/evaluation: the stored result, or 409 until there is one."""

from __future__ import annotations

import json
from pathlib import Path

from core.evaluation import EVALUATION_FILE
from core.store import jobs
from core.store.db import session_scope
from tests.api.in_process import Api, assert_problem


def test_evaluation_is_409_until_written_then_served(api: Api, tmp_path: Path) -> None:
    job_id = api.create()["id"]
    assert_problem(
        api.client.get(f"/jobs/{job_id}/evaluation"), 409, "evaluation_not_ready", "job_id"
    )
    with session_scope(api.db_url) as s:
        assert jobs.claim(s, job_id, worker="w")
        jobs.set_fields(s, job_id, artifacts_dir=str(tmp_path))
    stored = {"examples": 1, "base": {"rougeL": 0.1}, "tuned": {"rougeL": 0.3}, "answers": []}
    (tmp_path / EVALUATION_FILE).write_text(json.dumps(stored))
    body = api.client.get(f"/jobs/{job_id}/evaluation").json()
    assert body["object"] == "evaluation" and body["job_id"] == job_id
    assert body["tuned"]["rougeL"] > body["base"]["rougeL"]
    assert_problem(api.client.get("/jobs/job_nope/evaluation"), 404, "job_not_found", "job_id")
