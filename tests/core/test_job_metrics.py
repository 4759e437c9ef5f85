"""start_tracking (core/job_metrics.py): where a job's tracker runs are, on its row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.job_metrics import start_tracking
from core.settings import Settings
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.training import tracking
from tests.helpers import recipe_spec

EARLIER = {"mlflow": {"run_id": "0123abcd", "experiment": "medtune", "uri": "file:///mlruns"}}


def test_a_resumed_attempt_whose_tracker_fails_keeps_the_earlier_run(
    tmp_path: Path, sqlite_url: str, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("tracking server unreachable")

    monkeypatch.setattr(tracking, "installed", lambda name: True)
    monkeypatch.setattr(tracking.MlflowRun, "open", unreachable)
    spec = JobSpec.model_validate(recipe_spec("sample:medical_qa", report_to=["mlflow"]))
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, spec).id
        assert jobs.claim(s, job_id, worker="w")
        jobs.set_fields(s, job_id, tracking=EARLIER)  # the first attempt's run
    settings = Settings(home=tmp_path, database_url=sqlite_url, model_cache=model_cache)

    runs = start_tracking(settings, job_id, spec, tmp_path / "job")

    assert runs.runs == []
    with session_scope(sqlite_url) as s:
        job = jobs.get_job(s, job_id)
        assert job.tracking == EARLIER
        assert any(n.startswith("mlflow: run not started") for n in job.notes or [])
