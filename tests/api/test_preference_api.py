"""Preference jobs over HTTP: POST /jobs and /v1/fine_tuning/jobs (OpenAI's method object),
their refusals, and the reward columns of the metric rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.store import jobs
from core.store.db import session_scope
from tests.api.in_process import Api, assert_problem
from tests.api.in_process import api as api  # the in-process API fixture
from tests.helpers import recipe_spec, tiny_dataset

V1 = "/v1/fine_tuning/jobs"
PAIRS = "sample:medical_preference"


def dpo(dataset: str | Path = PAIRS, **training: Any) -> dict[str, Any]:
    return recipe_spec(dataset, method="dpo", **training)


def v1(api: Api, **body: Any) -> Any:
    return api.client.post(
        V1, json={"model": "smollm2-135m-instruct", "training_file": PAIRS, **body}
    )


def test_a_dpo_job_on_the_shipped_pairs_is_queued(api: Api) -> None:
    response = api.client.post("/jobs", json=dpo(preference={"beta": 0.25}))
    assert response.status_code == 201, response.text
    training = response.json()["spec"]["training_config"]
    assert training["method"] == "dpo" and training["preference"]["beta"] == 0.25


def test_a_dpo_job_on_question_answer_rows_is_a_422_naming_the_columns(
    api: Api, tmp_path: Path
) -> None:
    response = api.client.post("/jobs", json=dpo(tiny_dataset(tmp_path / "qa.jsonl")))
    body = assert_problem(response, 422, "dataset_not_preference", "training_dataset.name")
    assert "chosen and rejected" in body["detail"] and "preferred_output" in body["detail"]
    # The same rows, renamed into a pair, pass.
    rows = tmp_path / "renamed.jsonl"
    rows.write_text(json.dumps({"q": "a?", "good": "b", "bad": "c"}) + "\n")
    spec = dpo(rows)
    spec["training_dataset"]["rename_columns"] = {
        "q": "prompt",
        "good": "chosen",
        "bad": "rejected",
    }
    assert api.client.post("/jobs", json=spec).status_code == 201


def test_beta_zero_and_sft_only_settings_are_refused(api: Api) -> None:
    response = api.client.post("/jobs", json=dpo(preference={"beta": 0}))
    assert_problem(response, 422, "out_of_range", "training_config.preference.beta")
    response = api.client.post("/jobs", json=dpo(packing=True))
    body = assert_problem(response, 422, "method_conflict", "training_config")
    assert "training_config.packing" in body["detail"]
    sft = recipe_spec(PAIRS, preference={"beta": 0.1})
    response = api.client.post("/jobs", json=sft)
    assert_problem(response, 422, "method_conflict", "training_config.preference")


def test_openai_dpo_method_sets_the_method_and_beta(api: Api) -> None:
    method = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3, "n_epochs": 2}}}
    response = v1(api, method=method)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["method"]["type"] == "dpo"
    assert job["method"]["dpo"]["hyperparameters"]["beta"] == 0.3
    assert job["hyperparameters"]["n_epochs"] == 2
    stored = api.client.get(f"/jobs/{job['id']}").json()["spec"]["training_config"]
    assert (stored["method"], stored["preference"]["beta"]) == ("dpo", 0.3)
    supervised = v1(api, training_file="sample:medical_qa", method={"type": "supervised"})
    assert supervised.status_code == 200, supervised.text
    assert supervised.json()["method"] == {
        "type": "supervised",
        "supervised": {"hyperparameters": supervised.json()["hyperparameters"]},
    }


def test_openai_dpo_refusals_name_the_request_fields(api: Api) -> None:
    method = {"type": "dpo"}
    response = v1(api, training_file="sample:medical_qa", method=method)
    assert_problem(response, 422, "dataset_not_preference", "training_file")
    response = v1(api, method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}})
    assert_problem(response, 422, "out_of_range", "method.dpo.hyperparameters.beta")
    both = {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 3}}}
    response = v1(api, method=both, hyperparameters={"n_epochs": 2})
    assert_problem(response, 422, "conflicting_fields", "method.dpo.hyperparameters.n_epochs")
    mixed = {"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.1}}}
    assert_problem(v1(api, method=mixed), 422, "invalid_value", "method")
    medtune = {"training_config": {"method": "orpo"}}
    response = v1(api, method={"type": "dpo"}, medtune=medtune)
    assert_problem(response, 422, "conflicting_fields", "medtune.training_config.method")


def test_reward_columns_reach_the_metrics_rows_and_the_v1_events(api: Api) -> None:
    job_id = api.client.post("/jobs", json=dpo()).json()["id"]
    row = {"step": 1, "loss": 0.69, "rewards_chosen": 0.2, "rewards_rejected": -0.1}
    row |= {"rewards_margin": 0.3, "rewards_accuracy": 0.75, "eval_rewards_margin": 0.1}
    with session_scope(api.db_url) as s:
        assert jobs.claim(s, job_id, worker="test")
        jobs.add_metrics(s, job_id, [row, {"step": 1, "eval_rewards_accuracy": 0.5}])
    (stored,) = api.client.get(f"/jobs/{job_id}/metrics").json()["data"]
    assert {k: stored[k] for k in row} == row and stored["eval_rewards_accuracy"] == 0.5
    events = api.client.get(f"{V1}/{job_id}/events").json()["data"]
    (step,) = [e for e in events if e["type"] == "metrics"]
    assert step["data"]["rewards_margin"] == 0.3 and step["data"]["rewards_accuracy"] == 0.75
