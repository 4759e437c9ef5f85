"""/v1/fine_tuning in-process (SQLite store, fake queue); the pure mapping under it is tested in
tests/core/test_openai_shapes.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.queue import RUN_JOB_TASK, TRAIN_QUEUE
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from tests.api.files_helpers import JSONL, ROWS, upload
from tests.api.in_process import Api, FakeQueue, assert_problem
from tests.api.test_auth import bearer, build, new_key
from tests.helpers import recipe_spec

V1 = "/v1/fine_tuning/jobs"
SMOL = "smollm2-135m-instruct"
JOB_KEYS = {
    "object",
    "id",
    "model",
    "created_at",
    "finished_at",
    "fine_tuned_model",
    "organization_id",
    "status",
    "error",
    "hyperparameters",
    "trained_tokens",
    "training_file",
    "validation_file",
    "result_files",
    "seed",
    "estimated_finish",
    "user_provided_suffix",
    "method",
}


def create_v1(api: Api, **body: Any) -> dict[str, Any]:
    response = api.client.post(
        V1, json={"model": SMOL, "training_file": "sample:medical_qa", **body}
    )
    assert response.status_code == 200, response.text
    return response.json()


def run_to_end(
    api: Api,
    job_id: str,
    *,
    steps: int,
    status: JobStatus = JobStatus.succeeded,
    **values: Any,
) -> None:
    """Play a worker: claim, log ``steps`` metric rows, then finish with ``status``."""
    with session_scope(api.db_url) as s:
        assert jobs.claim(s, job_id, worker="test")
        jobs.set_fields(s, job_id, steps_total=steps, **values)
        jobs.add_metrics(
            s,
            job_id,
            [{"step": n, "loss": 2.0 / n, "learning_rate": 1e-4 * n} for n in range(1, steps + 1)],
        )
        if status == JobStatus.failed:
            jobs.finish(
                s, job_id, status, error_code="dataset_invalid", error_message="no answer column"
            )
        else:
            jobs.finish(s, job_id, status)


# --- create ------------------------------------------------------------------------------------


def test_create_with_auto_hyperparameters_is_a_medtune_job_with_recipe_defaults(api: Api) -> None:
    job = create_v1(api, hyperparameters={"n_epochs": "auto", "batch_size": "auto"})
    assert set(job) == JOB_KEYS
    assert job["object"] == "fine_tuning.job"
    assert job["status"] == "queued" and job["fine_tuned_model"] is None
    assert job["model"] == SMOL and job["training_file"] == "sample:medical_qa"
    assert job["hyperparameters"] == {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 1}
    assert isinstance(job["created_at"], int) and job["finished_at"] is None
    assert job["error"] is None and job["result_files"] == [] and job["seed"] == 42

    # The same job through medtune's own API, queued once like any POST /jobs.
    native = api.client.get(f"/jobs/{job['id']}").json()
    assert native["status"] == "queued"
    assert native["finetuned_model"] == "smollm2-135m-instruct-ft"
    training = native["spec"]["training_config"]
    assert training["learning_rate"] == 2e-4 and training["num_train_epochs"] == 1
    assert (training["per_device_train_batch_size"], training["gradient_accumulation_steps"]) == (
        2,
        4,
    )
    assert [(c.name, c.args, c.options) for c in api.queue.calls] == [
        (RUN_JOB_TASK, [job["id"]], {"queue": TRAIN_QUEUE})
    ]


def test_idempotency_key_replays_the_first_job_and_refuses_another_body(api: Api) -> None:
    body = {"model": SMOL, "training_file": "sample:medical_qa", "suffix": "once"}
    headers = {"Idempotency-Key": "v1-create-1"}
    first = api.client.post(V1, json=body, headers=headers)
    again = api.client.post(V1, json=body, headers=headers)
    assert first.status_code == again.status_code == 200, again.text
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert len(api.queue.calls) == 1  # the replay queued nothing
    other = api.client.post(V1, json={**body, "suffix": "twice"}, headers=headers)
    assert_problem(other, 409, "idempotency_key_reused", "Idempotency-Key")
    assert len(api.queue.calls) == 1


def test_create_with_numbers_suffix_seed_and_medtune_sections(api: Api) -> None:
    job = create_v1(
        api,
        suffix="cardio-v1",
        seed=7,
        hyperparameters={"n_epochs": 3, "batch_size": 16, "learning_rate_multiplier": 5},
        medtune={"lora_config": {"r": 8}, "training_config": {"max_steps": 9, "save_steps": 3}},
    )
    assert job["hyperparameters"] == {
        "n_epochs": 3,
        "batch_size": 16,
        "learning_rate_multiplier": 5,
    }
    assert job["seed"] == 7 and job["user_provided_suffix"] == "cardio-v1"
    spec = api.client.get(f"/jobs/{job['id']}").json()["spec"]
    assert spec["model_config"]["finetuned_model"] == "cardio-v1"
    assert spec["lora_config"]["r"] == 8
    training = spec["training_config"]
    assert training["learning_rate"] == pytest.approx(1e-3)
    assert training["num_train_epochs"] == 3 and training["seed"] == 7
    assert training["max_steps"] == 9 and training["save_steps"] == 3
    # An effective batch of 16 keeps the recipe's micro-batch of 2 and accumulates 8.
    assert training["per_device_train_batch_size"] == 2
    assert training["gradient_accumulation_steps"] == 8


def test_jobs_created_natively_read_back_through_v1(api: Api) -> None:
    native = api.client.post("/jobs", json=recipe_spec("sample:medical_qa", seed=3))
    assert native.status_code == 201
    job = api.client.get(f"{V1}/{native.json()['id']}").json()
    assert job["id"] == native.json()["id"] and job["status"] == "queued"
    assert job["seed"] == 3 and job["training_file"] == "sample:medical_qa"
    # recipe_spec: micro-batch 2, accumulation 1, learning rate 2e-3
    assert job["hyperparameters"] == {
        "n_epochs": 1,
        "batch_size": 2,
        "learning_rate_multiplier": 10,
    }


BAD_CREATE = [
    pytest.param(
        {"hyperparameters": {"learning_rate_multiplier": 0}},
        "out_of_range", "hyperparameters.learning_rate_multiplier", id="multiplier-zero",
    ),
    pytest.param(
        {"hyperparameters": {"n_epochs": "many"}},
        None, "hyperparameters.n_epochs", id="epochs-not-auto-or-int",
    ),
    pytest.param(
        {"hyperparameters": {"warmup": 3}}, "unknown_field", "hyperparameters.warmup",
        id="unknown-hyperparameter",
    ),
    pytest.param({"integrations": []}, "unknown_field", "integrations", id="unknown-top-field"),
    pytest.param(
        {"medtune": {"training_config": {"foo": 1}}},
        "unknown_field", "medtune.training_config.foo", id="unknown-medtune-key",
    ),
    pytest.param(
        {"medtune": {"training_config": {"warmup_steps": -1}}},
        "out_of_range", "medtune.training_config.warmup_steps", id="medtune-out-of-range",
    ),
    pytest.param({"suffix": "bad name!"}, "invalid_value", "suffix", id="suffix-unsafe"),
    pytest.param(
        {"training_file": "/no/such/qa.jsonl"}, "dataset_path_not_allowed", "training_file",
        id="training-file-outside-data-roots",
    ),
    pytest.param(
        {"model": "./no/such/model"}, "model_path_not_allowed", "model",
        id="model-outside-model-roots",
    ),
    pytest.param(
        {"validation_file": "/no/such/val.jsonl"}, "dataset_path_not_allowed", "validation_file",
        id="validation-file-outside-data-roots",
    ),
    pytest.param(
        {"validation_file": "not a dataset"}, "invalid_value", "validation_file",
        id="validation-file-bad-name",
    ),
    pytest.param(
        {"validation_file": "file-0000000000000000000000ff"}, "file_not_found",
        "validation_file", id="validation-file-not-uploaded",
    ),
    pytest.param(
        {"validation_file": "sample:medical_qa",
         "medtune": {"training_dataset": {"validation_share": 0.1}}},
        "invalid_value", "validation_file", id="validation-file-and-validation-share",
    ),
    pytest.param(
        {"validation_file": "sample:medical_qa",
         "medtune": {"validation_dataset": {"name": "other.jsonl"}}},
        "conflicting_fields", "medtune.validation_dataset.name",
        id="medtune-contradicts-validation-file",
    ),
    pytest.param(
        {"validation_file": "sample:medical_qa",
         "medtune": {"validation_dataset": {"columns": {"question": "q"}}}},
        "invalid_value", "medtune.validation_dataset.columns",
        id="validation-file-with-bad-columns",
    ),
    pytest.param(
        {"medtune": {"validation_dataset": {"name": "a.jsonl"},
                     "training_dataset": {"validation_share": 0.2}}},
        "invalid_value", "medtune.validation_dataset", id="medtune-validation-and-share",
    ),
    pytest.param(
        {"medtune": {"lora_config": {"target_modules": ["q_proj", ""]}}},
        "out_of_range", "medtune.lora_config.target_modules[1]", id="list-item-in-brackets",
    ),
    pytest.param(
        {"medtune": {"model_config": {"base_model": "other-model"}}},
        "conflicting_fields", "medtune.model_config.base_model", id="medtune-contradicts-model",
    ),
    pytest.param(
        {"hyperparameters": {"batch_size": 16},
         "medtune": {"training_config": {"gradient_accumulation_steps": 3}}},
        "conflicting_fields", "medtune.training_config.gradient_accumulation_steps",
        id="medtune-contradicts-batch-size",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("override", "code", "field"), BAD_CREATE)
def test_bad_create_is_a_problem_naming_the_openai_field_and_stores_nothing(
    api: Api, override: dict[str, Any], code: str | None, field: str
) -> None:
    before = api.snapshot()
    body = {"model": SMOL, "training_file": "sample:medical_qa", **override}
    response = api.client.post(V1, json=body)
    assert response.status_code == (404 if code == "file_not_found" else 422), response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["field"] == field, problem
    if code is not None:
        assert problem["code"] == code
    assert problem["instance"] == V1 and problem["detail"]
    assert api.snapshot() == before
    assert api.queue.calls == []


# --- validation_file ----------------------------------------------------------------------------


def test_validation_file_is_the_jobs_validation_dataset(api: Api) -> None:
    training = upload(api.client, "train.jsonl", JSONL, path="/v1/files").json()["id"]
    validation = upload(api.client, "val.jsonl", b"".join(ROWS[6:9]), path="/v1/files").json()
    job = create_v1(api, training_file=training, validation_file=validation["id"])
    assert job["training_file"] == training and job["validation_file"] == validation["id"]
    assert api.client.get(f"{V1}/{job['id']}").json()["validation_file"] == validation["id"]
    spec = api.client.get(f"/jobs/{job['id']}").json()["spec"]
    assert spec["validation_dataset"]["name"] == validation["id"]
    assert spec["training_dataset"]["validation_share"] == 0
    # The job needs the file until it ends, like its training file.
    refused = api.client.delete(f"/v1/files/{validation['id']}")
    assert_problem(refused, 409, "file_in_use", "file_id")
    # medtune.validation_dataset may add the other source fields.
    more = create_v1(
        api,
        validation_file=validation["id"],
        medtune={"validation_dataset": {"max_samples": 2}},
    )
    again = api.client.get(f"/jobs/{more['id']}").json()["spec"]["validation_dataset"]
    assert again["name"] == validation["id"] and again["max_samples"] == 2
    # Without one, the job object says null.
    assert create_v1(api)["validation_file"] is None


@pytest.fixture
def secure_v1(sqlite_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(build(sqlite_url, tmp_path / "home", FakeQueue())) as client:
        yield client


def test_a_validation_file_of_another_key_is_not_found(
    secure_v1: TestClient, sqlite_url: str
) -> None:
    _, alice = new_key(sqlite_url, name="alice")
    _, bob = new_key(sqlite_url, name="bob")
    mine = upload(secure_v1, "t.jsonl", JSONL, path="/v1/files", headers=bearer(bob)).json()["id"]
    theirs = upload(secure_v1, "v.jsonl", JSONL, path="/v1/files", headers=bearer(alice))
    body = {"model": SMOL, "training_file": mine, "validation_file": theirs.json()["id"]}
    refused = secure_v1.post(V1, json=body, headers=bearer(bob))
    problem = assert_problem(refused, 404, "file_not_found", "validation_file")
    assert theirs.json()["id"] in problem["detail"]
    assert secure_v1.get(V1, headers=bearer(bob)).json()["data"] == []
    own = secure_v1.post(V1, json={**body, "validation_file": mine}, headers=bearer(bob))
    assert own.status_code == 200, own.text
    assert own.json()["validation_file"] == mine


# --- read, list, cancel ------------------------------------------------------------------------


def test_succeeded_job_shape(api: Api) -> None:
    job_id = create_v1(api, suffix="done-model")["id"]
    run_to_end(api, job_id, steps=3, dataset_stats={"examples": 8, "trained_tokens": 1234})
    job = api.client.get(f"{V1}/{job_id}").json()
    assert job["status"] == "succeeded"
    assert job["fine_tuned_model"] == "done-model"
    assert job["trained_tokens"] == 1234
    assert isinstance(job["finished_at"], int) and job["finished_at"] >= job["created_at"]
    assert job["error"] is None and job["estimated_finish"] is None


def test_failed_job_has_an_openai_error(api: Api) -> None:
    job_id = create_v1(api)["id"]
    run_to_end(api, job_id, steps=1, status=JobStatus.failed)
    job = api.client.get(f"{V1}/{job_id}").json()
    assert job["status"] == "failed" and job["fine_tuned_model"] is None
    assert job["error"] == {
        "code": "dataset_invalid",
        "message": "no answer column",
        "param": "training_file",
    }


def test_list_pages_newest_first_with_after(api: Api) -> None:
    ids = [create_v1(api)["id"] for _ in range(3)]
    ids.append(api.client.post("/jobs", json=recipe_spec("sample:medical_qa")).json()["id"])
    first = api.client.get(V1, params={"limit": 3}).json()
    assert set(first) == {"object", "data", "has_more"}
    assert first["object"] == "list" and first["has_more"] is True
    assert [j["id"] for j in first["data"]] == ids[::-1][:3]
    assert all(j["object"] == "fine_tuning.job" for j in first["data"])
    rest = api.client.get(V1, params={"limit": 3, "after": first["data"][-1]["id"]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and rest["has_more"] is False
    # Every job is listed by both APIs.
    assert {j["id"] for j in api.client.get("/jobs").json()["data"]} == set(ids)


def test_cancel_through_v1_is_seen_by_jobs(api: Api) -> None:
    job_id = create_v1(api)["id"]
    cancelled = api.client.post(f"{V1}/{job_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert api.client.get(f"/jobs/{job_id}").json()["status"] == "cancelled"
    again = api.client.post(f"{V1}/{job_id}/cancel")
    assert_problem(again, 409, "job_not_cancellable", "job_id")


def test_cancel_of_a_running_job_is_requested(api: Api) -> None:
    job_id = create_v1(api)["id"]
    with session_scope(api.db_url) as s:
        assert jobs.claim(s, job_id, worker="w")
    body = api.client.post(f"{V1}/{job_id}/cancel").json()
    assert body["status"] == "running"
    assert api.client.get(f"/jobs/{job_id}").json()["cancel_requested"] is True


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", f"{V1}/job_missing"),
        ("post", f"{V1}/job_missing/cancel"),
        ("get", f"{V1}/job_missing/events"),
        ("get", f"{V1}/job_missing/checkpoints"),
    ],
)
def test_unknown_job_is_a_404_problem(api: Api, method: str, path: str) -> None:
    body = assert_problem(api.client.request(method, path), 404, "job_not_found", "job_id")
    assert body["instance"] == path


def test_list_after_an_unknown_job_is_a_404_problem(api: Api) -> None:
    response = api.client.get(V1, params={"after": "job_missing"})
    assert_problem(response, 404, "job_not_found", "after")


# --- events ------------------------------------------------------------------------------------


def test_events_from_metric_rows_newest_first(api: Api) -> None:
    job_id = create_v1(api)["id"]
    run_to_end(api, job_id, steps=5)
    page = api.client.get(f"{V1}/{job_id}/events").json()
    assert page["object"] == "list" and page["has_more"] is False
    events = page["data"]
    assert [e["id"].removeprefix(f"ftevent-{job_id}-") for e in events] == [
        "finished", "step-5", "step-4", "step-3", "step-2", "step-1", "started", "created",
    ]  # fmt: skip
    assert all(e["object"] == "fine_tuning.job.event" for e in events)
    assert all(isinstance(e["created_at"], int) for e in events)
    metric = events[1]
    assert metric["type"] == "metrics" and metric["level"] == "info"
    assert metric["data"]["step"] == 5 and metric["data"]["total_steps"] == 5
    assert metric["data"]["train_loss"] == pytest.approx(0.4)
    assert metric["data"]["learning_rate"] == pytest.approx(5e-4)
    assert "Step 5/5" in metric["message"]
    assert events[0]["type"] == "message" and events[0]["data"] is None
    assert events[0]["message"] == "The job has successfully completed"


def test_events_page_with_after(api: Api) -> None:
    job_id = create_v1(api)["id"]
    run_to_end(api, job_id, steps=5)
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 3}
    while True:
        page = api.client.get(f"{V1}/{job_id}/events", params=params).json()
        seen += [e["id"] for e in page["data"]]
        if not page["has_more"]:
            break
        params["after"] = page["data"][-1]["id"]
    everything = api.client.get(f"{V1}/{job_id}/events", params={"limit": 100}).json()["data"]
    assert seen == [e["id"] for e in everything] and len(seen) == 8


def test_events_of_a_failed_job_end_with_an_error(api: Api) -> None:
    job_id = create_v1(api)["id"]
    run_to_end(api, job_id, steps=1, status=JobStatus.failed)
    newest = api.client.get(f"{V1}/{job_id}/events", params={"limit": 1}).json()
    assert newest["has_more"] is True
    assert newest["data"][0]["level"] == "error"
    assert "no answer column" in newest["data"][0]["message"]


def test_events_of_a_queued_job(api: Api) -> None:
    job_id = create_v1(api)["id"]
    events = api.client.get(f"{V1}/{job_id}/events").json()["data"]
    assert [e["id"] for e in events] == [f"ftevent-{job_id}-created"]


def test_events_after_a_foreign_id_is_a_problem(api: Api) -> None:
    job_id = create_v1(api)["id"]
    response = api.client.get(f"{V1}/{job_id}/events", params={"after": "ftevent-job_x-step-3"})
    assert_problem(response, 400, "invalid_cursor", "after")


# --- checkpoints -------------------------------------------------------------------------------


def fake_checkpoint(root: Path, step: int, loss: float) -> None:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    state = {"log_history": [{"step": step, "loss": loss}]}
    (folder / "trainer_state.json").write_text(json.dumps(state))


def test_checkpoints_shape_newest_first(api: Api, tmp_path: Path) -> None:
    job_id = create_v1(api, suffix="ckpt-model")["id"]
    artifacts = tmp_path / "artifacts" / job_id
    root = artifacts / "outputs" / "checkpoints"
    fake_checkpoint(root, 2, 1.5)
    fake_checkpoint(root, 4, 0.75)
    (root / ".staging").mkdir()  # debris of an interrupted save is not a checkpoint
    run_to_end(api, job_id, steps=4, artifacts_dir=str(artifacts))
    page = api.client.get(f"{V1}/{job_id}/checkpoints").json()
    assert page["object"] == "list" and page["has_more"] is False
    assert [c["step_number"] for c in page["data"]] == [4, 2]
    newest = page["data"][0]
    assert newest["object"] == "fine_tuning.job.checkpoint"
    assert newest["metrics"] == {"step": 4, "train_loss": 0.75}
    assert newest["fine_tuned_model_checkpoint"] == "ckpt-model:ckpt-step-4"
    assert newest["fine_tuning_job_id"] == job_id and isinstance(newest["created_at"], int)
    assert (page["first_id"], page["last_id"]) == (newest["id"], page["data"][1]["id"])
    # The same checkpoints as medtune's own listing.
    native = api.client.get(f"/jobs/{job_id}/checkpoints").json()["data"]
    assert sorted(c["step"] for c in native) == [2, 4]
    older = api.client.get(
        f"{V1}/{job_id}/checkpoints", params={"after": newest["id"], "limit": 1}
    ).json()
    assert [c["step_number"] for c in older["data"]] == [2] and older["has_more"] is False


def test_checkpoints_of_a_queued_job_are_empty(api: Api) -> None:
    job_id = create_v1(api)["id"]
    page = api.client.get(f"{V1}/{job_id}/checkpoints").json()
    assert page == {
        "object": "list",
        "data": [],
        "has_more": False,
        "first_id": None,
        "last_id": None,
    }
