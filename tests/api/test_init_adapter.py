"""model_config.init_adapter: checked at submit (owner, status, adapter, base, LoRA shape); a
job others continue from cannot be deleted meanwhile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlmodel import col

from core.store import jobs
from core.store.db import session_scope
from core.store.models import Job, JobStatus
from tests.api.in_process import Api, FakeQueue, assert_problem
from tests.api.test_auth import bearer, build, new_key
from tests.api.test_job_delete import finished
from tests.helpers import recipe_spec


def continuing(source: str, **lora: Any) -> dict[str, Any]:
    spec = recipe_spec("sample:medical_qa")
    spec["model_config"]["init_adapter"] = source
    spec["lora_config"].update(lora)
    return spec


def test_a_job_continues_a_succeeded_one(api: Api, tmp_path: Path) -> None:
    source = api.create()["id"]
    finished(api.db_url, source, tmp_path / "home")
    made = api.client.post("/jobs", json=continuing(source))
    assert made.status_code == 201, made.text
    assert made.json()["spec"]["model_config"]["init_adapter"] == source
    # target_modules in another order are the same adapter shape
    again = continuing(
        source,
        target_modules=[
            "down_proj",
            "up_proj",
            "gate_proj",
            "o_proj",
            "v_proj",
            "k_proj",
            "q_proj",
        ],
    )
    assert api.client.post("/jobs", json=again).status_code == 201


def test_the_source_is_checked(api: Api, tmp_path: Path) -> None:
    home = tmp_path / "home"
    queued = api.create()["id"]
    no_adapter, other_base, source = (api.create()["id"] for _ in range(3))
    finished(api.db_url, source, home)
    folder = finished(api.db_url, no_adapter, home)
    (folder / "adapter" / "adapter_config.json").unlink()
    finished(api.db_url, other_base, home)
    with session_scope(api.db_url) as s:
        s.execute(update(Job).where(col(Job.id) == other_base).values(base_model="org/other"))
        s.commit()
    cases = [
        ("job_" + "0" * 24, {}, "init_adapter_not_found", "model_config.init_adapter"),
        (queued, {}, "init_adapter_not_ready", "model_config.init_adapter"),
        (no_adapter, {}, "init_adapter_missing", "model_config.init_adapter"),
        (other_base, {}, "init_adapter_base_mismatch", "model_config.init_adapter"),
        (source, {"r": 8}, "init_adapter_lora_mismatch", "lora_config.r"),
        (
            source,
            {"target_modules": ["q_proj"]},
            "init_adapter_lora_mismatch",
            "lora_config.target_modules",
        ),
    ]
    for job_id, lora, code, field in cases:
        response = api.client.post("/jobs", json=continuing(job_id, **lora))
        assert_problem(response, 422, code, field)
    bad = api.client.post("/jobs", json=continuing("../../etc"))
    assert_problem(bad, 422, "invalid_value", "model_config.init_adapter")


def test_another_keys_job_is_not_found(sqlite_url: str, tmp_path: Path) -> None:
    _, a = new_key(sqlite_url, name="a")
    _, b = new_key(sqlite_url, name="b")
    with TestClient(build(sqlite_url, tmp_path / "home", FakeQueue())) as client:
        source = client.post("/jobs", json=recipe_spec("sample:medical_qa"), headers=bearer(a))
        finished(sqlite_url, source.json()["id"], tmp_path / "home")
        spec = continuing(source.json()["id"])
        theirs = client.post("/jobs", json=spec, headers=bearer(b))
        problem = assert_problem(theirs, 422, "init_adapter_not_found", "model_config.init_adapter")
        assert a not in problem["detail"]
        assert client.post("/jobs", json=spec, headers=bearer(a)).status_code == 201


@pytest.mark.parametrize("then", ["cancel", "finish"])
def test_a_source_in_use_cannot_be_deleted(api: Api, tmp_path: Path, then: str) -> None:
    source = api.create()["id"]
    finished(api.db_url, source, tmp_path / "home")
    user = api.client.post("/jobs", json=continuing(source)).json()["id"]
    problem = assert_problem(api.client.delete(f"/jobs/{source}"), 409, "adapter_in_use", "job_id")
    assert user in problem["detail"]
    if then == "cancel":
        api.client.post(f"/jobs/{user}/cancel")
    else:
        with session_scope(api.db_url) as s:
            assert jobs.claim(s, user, worker="w")
            jobs.finish(s, user, JobStatus.failed)
    assert api.client.delete(f"/jobs/{source}").status_code == 200
