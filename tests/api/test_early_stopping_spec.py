"""training_config.early_stopping and keep: accepted with a validation split, 422 without;
GET /jobs/{id} says why training stopped and which step was kept."""

from __future__ import annotations

from typing import Any

import pytest

from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from tests.api.in_process import Api, assert_problem
from tests.helpers import recipe_spec


def spec(share: float, **training: Any) -> dict[str, Any]:
    body = recipe_spec("sample:medical_qa", **training)
    body["training_dataset"]["validation_share"] = share
    return body


@pytest.mark.parametrize(
    "training",
    [
        {"early_stopping": {"patience": 2}},
        {"keep": "best"},
        {"keep": "best", "eval_strategy": "no"},
    ],
)
def test_without_a_validation_split_or_evaluations_it_is_422(
    api: Api, training: dict[str, Any]
) -> None:
    share = 0.2 if training.get("eval_strategy") else 0.0
    problem = assert_problem(
        api.client.post("/jobs", json=spec(share, **training)), 422, "needs_validation", None
    )
    assert problem["field"].startswith("training_config")
    assert "validation_share" in problem["detail"] or "eval_strategy" in problem["detail"]


def test_early_stopping_with_end_only_evaluations_is_422(api: Api) -> None:
    body = spec(0.2, early_stopping={"patience": 1}, eval_strategy="end")
    problem = assert_problem(api.client.post("/jobs", json=body), 422, "needs_validation", None)
    assert "'steps'" in problem["detail"]


def test_accepted_and_reported(api: Api) -> None:
    body = spec(0.2, early_stopping={"patience": 2, "min_delta": 0.01}, keep="best")
    made = api.client.post("/jobs", json=body)
    assert made.status_code == 201, made.text
    job = made.json()
    assert job["spec"]["training_config"]["early_stopping"] == {"patience": 2, "min_delta": 0.01}
    assert job["stop_reason"] is None and job["kept_step"] is None
    with session_scope(api.db_url) as s:
        assert jobs.claim(s, job["id"], worker="w")
        jobs.finish(s, job["id"], JobStatus.succeeded, stop_reason="early_stopping", kept_step=6)
    got = api.client.get(f"/jobs/{job['id']}").json()
    assert (got["stop_reason"], got["kept_step"]) == ("early_stopping", 6)
    bad = spec(0.2, early_stopping={"patience": 0})
    assert_problem(api.client.post("/jobs", json=bad), 422, "out_of_range", None)
