"""A job hands its model back when it ends, whatever the outcome: a failed job's adapter and
optimizer state must not hold the card until the worker's next job (core/pipeline.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core import job_start
from core.errors import DatasetError
from core.pipeline import run_job
from core.settings import Settings
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from core.training import engines
from tests.helpers import recipe_spec


def test_a_job_that_fails_after_its_model_loaded_hands_it_back(
    tmp_path: Path, sqlite_url: str, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = object()
    given_back: list[Any] = []

    def fails_after_loading(*args: Any, **kwargs: Any) -> Any:
        job_start._running().append(model)  # as data_and_model holds a loaded model
        raise DatasetError("refused by the gate", field="training_dataset", code="dataset_empty")

    monkeypatch.setattr(job_start, "data_and_model", fails_after_loading)
    monkeypatch.setattr(engines, "give_back", given_back.append)
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, JobSpec.model_validate(recipe_spec("sample:medical_qa"))).id
    settings = Settings(home=tmp_path, database_url=sqlite_url, model_cache=model_cache)

    assert run_job(job_id, settings, worker="w") == JobStatus.failed
    assert given_back == [model]
    assert job_start._running() == []
