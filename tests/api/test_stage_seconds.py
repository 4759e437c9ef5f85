"""GET /jobs/{id} says how long each stage of a job took (``stage_seconds``)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from core.pipeline import run_job
from core.settings import Settings
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from tests.api.in_process import Api
from tests.api.in_process import api as api  # the in-process API fixture
from tests.helpers import recipe_spec


def test_a_queued_job_has_no_stage_seconds(api: Api) -> None:
    created = api.client.post("/jobs", json=recipe_spec("sample:medical_qa", max_steps=1))
    assert created.status_code == 201, created.text
    assert created.json()["stage_seconds"] is None


@pytest.mark.slow
def test_a_finished_job_reports_each_stages_seconds(
    api: Api, tmp_path: Path, model_cache: Path
) -> None:
    spec = recipe_spec("sample:medical_qa", max_steps=1, save_steps=0)
    spec["training_dataset"]["max_samples"] = 16
    with session_scope(api.db_url) as s:
        job_id = jobs.create_job(s, JobSpec.model_validate(spec)).id
    settings = Settings(home=tmp_path / "home", database_url=api.db_url, model_cache=model_cache)
    assert run_job(job_id, settings, worker="w") == JobStatus.succeeded
    job = api.client.get(f"/jobs/{job_id}").json()
    seconds = job["stage_seconds"]
    # In the order the stages ran; the model load is apart from the training it precedes.
    assert list(seconds) == ["preparing_data", "loading_model", "training", "exporting"]
    assert all(v >= 0 for v in seconds.values()) and seconds["training"] > 0
    assert job["finished_at"] and job["started_at"]
    wall = (_parse(job["finished_at"]) - _parse(job["started_at"])).total_seconds()
    assert sum(seconds.values()) <= wall + 1.0  # the stages lie inside the job's own time


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
