"""POST /jobs with a validation_dataset: checked at submit time like the training dataset, and
GET /jobs/{id}/dataset reports it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.pipeline import run_job
from core.settings import Settings
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from tests.api.files_helpers import JSONL, upload
from tests.api.in_process import Api, FakeQueue, assert_problem
from tests.api.test_auth import bearer, build, new_key
from tests.helpers import recipe_spec, unrepeated_words


def spec_with(validation: dict[str, Any], **dataset: Any) -> dict[str, Any]:
    spec = recipe_spec("sample:medical_qa")
    spec["training_dataset"].update(dataset)
    spec["validation_dataset"] = validation
    return spec


def test_validation_dataset_and_validation_share_is_a_422_naming_the_fix(api: Api) -> None:
    response = api.client.post(
        "/jobs", json=spec_with({"name": "sample:medical_qa"}, validation_share=0.1)
    )
    body = assert_problem(response, 422, "invalid_value", "validation_dataset")
    assert "set validation_share to 0" in body["detail"]
    assert api.queue.calls == []


def test_the_validation_path_is_checked_at_submit_time(api: Api, tmp_path: Path) -> None:
    outside = api.client.post("/jobs", json=spec_with({"name": "/etc/val.jsonl"}))
    assert_problem(outside, 422, "dataset_path_not_allowed", "validation_dataset.name")
    missing = api.client.post("/jobs", json=spec_with({"name": str(tmp_path / "none.jsonl")}))
    body = assert_problem(missing, 422, "dataset_not_found", "validation_dataset.name")
    assert body["detail"].startswith("validation_dataset: ")
    bad_name = api.client.post("/jobs", json=spec_with({"name": "no such name"}))
    assert_problem(bad_name, 422, "invalid_value", "validation_dataset.name")
    assert api.queue.calls == []
    created = api.client.post("/jobs", json=spec_with({"name": "sample:medical_qa"}))
    assert created.status_code == 201, created.text
    assert created.json()["spec"]["validation_dataset"]["name"] == "sample:medical_qa"


def test_a_file_used_for_validation_cannot_be_deleted_while_the_job_runs(api: Api) -> None:
    file_id = upload(api.client, "val.jsonl", JSONL).json()["id"]
    job = api.client.post("/jobs", json=spec_with({"name": f"file:{file_id}"})).json()
    refused = assert_problem(api.client.delete(f"/files/{file_id}"), 409, "file_in_use", "file_id")
    assert job["id"] in refused["detail"]
    assert api.client.post(f"/jobs/{job['id']}/cancel").status_code == 200
    assert api.client.delete(f"/files/{file_id}").status_code == 200


@pytest.fixture
def secure(sqlite_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(build(sqlite_url, tmp_path / "home", FakeQueue())) as client:
        yield client


def test_a_validation_file_must_be_the_callers(secure: TestClient, sqlite_url: str) -> None:
    _, alice = new_key(sqlite_url, name="alice")
    _, bob = new_key(sqlite_url, name="bob")
    theirs = upload(secure, "v.jsonl", JSONL, headers=bearer(alice)).json()["id"]
    refused = secure.post("/jobs", json=spec_with({"name": theirs}), headers=bearer(bob))
    assert_problem(refused, 404, "file_not_found", "validation_dataset.name")
    mine = secure.post("/jobs", json=spec_with({"name": theirs}), headers=bearer(alice))
    assert mine.status_code == 201, mine.text


def test_job_dataset_stats_report_the_validation_set(
    api: Api, tmp_path: Path, model_cache: Path
) -> None:
    """A validation set the gate refuses (every example cut): the job fails before training,
    and GET /jobs/{id}/dataset shows the training set and the refused validation set."""
    held = tmp_path / "val.jsonl"
    rows = [{"question": f"long {i}?", "answer": unrepeated_words(400)} for i in range(3)]
    held.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    spec = spec_with({"name": str(held)})
    with session_scope(api.db_url) as s:
        job_id = jobs.create_job(s, JobSpec.model_validate(spec)).id
    settings = Settings(home=tmp_path / "home", database_url=api.db_url, model_cache=model_cache)
    assert run_job(job_id, settings, worker="w") == JobStatus.failed
    job = api.client.get(f"/jobs/{job_id}").json()
    assert job["error"]["code"] == "too_many_truncated", job["error"]
    assert job["error"]["message"].startswith("validation_dataset: ")
    response = api.client.get(f"/jobs/{job_id}/dataset")
    assert response.status_code == 200, response.text
    stats = response.json()["stats"]
    assert stats["source"] == "sample:medical_qa" and stats["gate"]["passed"] is True
    validation = stats["validation"]
    assert validation["kind"] == "validation_dataset" and validation["source"] == str(held)
    assert validation["rows"] == 3 and validation["truncated"] == 3
    assert validation["gate"]["passed"] is False
    assert validation["gate"]["problems"][0]["code"] == "too_many_truncated"
