"""The HTTP API in-process (tests/api/in_process.py): jobs, metrics, events, /infer, health."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from cli.client import parse_sse
from core.queue import INFER_QUEUE, INFER_TASK, RUN_JOB_TASK, TRAIN_QUEUE
from core.spec import RECIPE_SYSTEM_PROMPT, JobSpec
from core.store import jobs
from core.store.db import session_scope
from tests.api.in_process import Api, FakeQueue, assert_problem, make_client
from tests.helpers import recipe_spec, sse

# --- POST /jobs --------------------------------------------------------------------------------


def test_create_job_stores_it_and_enqueues_it_once(api: Api) -> None:
    recipe = recipe_spec("sample:medical_qa")
    before = len(api.snapshot()["jobs"])
    response = api.client.post("/jobs", json=recipe)
    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/json"
    job = response.json()
    assert job["object"] == "job"
    assert job["id"].startswith("job_")
    assert job["status"] == "queued"
    assert job["base_model"] == "smollm2-135m-instruct"
    assert job["finetuned_model"] == recipe["model_config"]["finetuned_model"]
    assert job["spec"] == JobSpec.model_validate(recipe).to_json()
    assert job["steps_done"] == 0 and job["error"] is None
    assert datetime.fromisoformat(job["created_at"]).utcoffset() is not None  # stamps carry UTC

    assert len(api.queue.calls) == 1
    sent = api.queue.calls[0]
    assert sent.name == RUN_JOB_TASK
    assert sent.args == [job["id"]]
    assert sent.options == {"queue": TRAIN_QUEUE}

    assert len(api.snapshot()["jobs"]) == before + 1
    got = api.client.get(f"/jobs/{job['id']}")
    assert got.status_code == 200
    assert got.json() == job


def test_create_job_with_defaults_for_omitted_sections(api: Api) -> None:
    response = api.client.post(
        "/jobs",
        json={
            "model_config": {"base_model": "smollm2-135m-instruct"},
            "training_dataset": {"name": "sample:medical_qa"},
        },
    )
    assert response.status_code == 201, response.text
    spec = response.json()["spec"]
    assert spec["lora_config"]["r"] == 16
    assert spec["training_config"]["learning_rate"] == 2e-4
    assert spec["training_dataset"]["system_prompt"] == RECIPE_SYSTEM_PROMPT
    assert len(api.queue.calls) == 1


def test_missing_dataset_file_in_an_allowed_folder_is_not_found(api: Api, tmp_path: Path) -> None:
    response = api.client.post("/jobs", json=recipe_spec(tmp_path / "nowhere" / "qa.jsonl"))
    assert_problem(response, 422, "dataset_not_found", "training_dataset.name")
    assert api.queue.calls == []


def test_create_job_accepts_an_existing_dataset_file(api: Api, tmp_path: Path) -> None:
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n', encoding="utf-8")
    response = api.client.post("/jobs", json=recipe_spec(data))
    assert response.status_code == 201, response.text
    assert response.json()["spec"]["training_dataset"]["name"] == str(data)


JSON = {"content-type": "application/json"}
BAD_INPUT = [
    # (method, path, request kwargs, status, code, field)
    pytest.param(
        "post", "/jobs", {"content": b'{"model_config": {', "headers": JSON},
        422, "invalid_json", None, id="malformed-json",
    ),
    pytest.param(
        "post", "/jobs", {"json": {"model_config": {"foo": 1}}},
        422, "unknown_field", "model_config.foo", id="unknown-key",
    ),
    pytest.param(
        "post", "/jobs", {"json": {**recipe_spec("sample:medical_qa"), "extra": True}},
        422, "unknown_field", "extra", id="unknown-top-level-key",
    ),
    pytest.param(
        "post", "/jobs", {"json": recipe_spec("sample:medical_qa", learning_rate=-2e-4)},
        422, "out_of_range", "training_config.learning_rate", id="negative-learning-rate",
    ),
    pytest.param(
        "post", "/jobs", {"json": recipe_spec("sample:medical_qa", max_steps=True)},
        422, "invalid_type", "training_config.max_steps", id="bool-for-an-integer",
    ),
    pytest.param(
        "post", "/jobs", {"json": recipe_spec("sample:medical_qa", max_steps="5")},
        422, "invalid_type", "training_config.max_steps", id="string-for-an-integer",
    ),
    pytest.param(
        "post", "/jobs", {"json": recipe_spec("sample:medical_qa", learning_rate="2e-4")},
        422, "invalid_type", "training_config.learning_rate", id="string-for-a-float",
    ),
    pytest.param(
        "post", "/jobs",
        {"json": recipe_spec("sample:medical_qa", num_train_epochs=0, max_steps=0)},
        422, "invalid_value", "training_config.num_train_epochs", id="zero-epochs-and-no-steps",
    ),
    pytest.param(
        "post", "/jobs", {"json": recipe_spec("sample:medical_qa", optim="adam_9bit")},
        422, "invalid_choice", "training_config.optim", id="unknown-optimizer",
    ),
    pytest.param(
        "post", "/jobs", {"json": recipe_spec("/no/such/dir/qa.jsonl")},
        422, "dataset_path_not_allowed", "training_dataset.name", id="dataset-outside-roots",
    ),
    pytest.param(
        "post", "/jobs", {"json": recipe_spec("sample:cardiology")},
        422, "dataset_not_found", "training_dataset.name", id="unknown-sample",
    ),
    pytest.param(
        "post", "/jobs",
        {"json": {**recipe_spec("sample:medical_qa"),
                  "model_config": {"base_model": "./no/such/model"}}},
        422, "model_path_not_allowed", "model_config.base_model",
        id="base-model-folder-outside-model-roots",
    ),
    pytest.param(
        "post", "/jobs",
        {"json": {**recipe_spec("sample:medical_qa"),
                  "lora_config": {"target_modules": ["q_proj", "c_attn"]}}},
        422, "unknown_target_module", "lora_config.target_modules",
        id="target-module-the-embedded-llama-lacks",
    ),
    pytest.param("get", "/jobs/job_missing", {}, 404, "job_not_found", "job_id", id="get-404"),
    pytest.param(
        "post", "/jobs/job_missing/cancel", {}, 404, "job_not_found", "job_id", id="cancel-404"
    ),
    pytest.param(
        "get", "/jobs/job_missing/metrics", {}, 404, "job_not_found", "job_id", id="metrics-404"
    ),
    pytest.param(
        "get", "/jobs/job_missing/events", {}, 404, "job_not_found", "job_id", id="events-404"
    ),
    pytest.param(
        "post", "/infer", {"json": {"job_id": "job_missing", "question": "Fever?"}},
        404, "job_not_found", "job_id", id="infer-404",
    ),
    pytest.param(
        "post", "/jobs/{finished}/cancel", {},
        409, "job_not_cancellable", "job_id", id="cancel-finished-409",
    ),
    pytest.param(
        "post", "/infer", {"json": {"job_id": "{queued}", "question": "Fever?"}},
        409, "job_not_ready", "job_id", id="infer-queued-409",
    ),
    pytest.param(
        "post", "/infer",
        {"json": {"job_id": "{finished}", "question": "Fever?",
                  "messages": [{"role": "user", "content": "Fever?"}]}},
        422, "invalid_value", "body", id="infer-question-and-messages",
    ),
    pytest.param(
        "post", "/infer", {"json": {"job_id": "{finished}"}},
        422, "invalid_value", "body", id="infer-neither-question-nor-messages",
    ),
    pytest.param(
        "post", "/infer",
        {"json": {"job_id": "{finished}",
                  "messages": [{"role": "user", "content": "Q"},
                               {"role": "assistant", "content": "A"}]}},
        422, "invalid_value", "body", id="infer-last-message-not-user",
    ),
    pytest.param(
        "get", "/jobs?cursor=not-a-cursor", {}, 400, "invalid_cursor", "cursor", id="bad-cursor"
    ),
    pytest.param("get", "/jobs?limit=0", {}, 422, "out_of_range", "limit", id="limit-0"),
    pytest.param(
        "get", "/jobs?status=sleeping", {}, 422, "invalid_choice", "status", id="bad-status"
    ),
]  # fmt: skip


def _fill(value: Any, ids: dict[str, str]) -> Any:
    """Put the seeded job ids into a path or JSON body."""
    if isinstance(value, str):
        for name, job_id in ids.items():
            value = value.replace("{" + name + "}", job_id)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, ids) for v in value]
    return value


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "code", "field"), BAD_INPUT)
def test_bad_input_is_a_problem_and_changes_nothing(
    api: Api,
    seeded: dict[str, str],
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    code: str,
    field: str | None,
) -> None:
    before = api.snapshot()
    assert len(before["jobs"]) == 2 and len(before["job_metrics"]) == 5
    request = {k: (_fill(v, seeded) if k == "json" else v) for k, v in kwargs.items()}
    response = api.client.request(method, _fill(path, seeded), **request)
    body = assert_problem(response, status, code, field)
    assert body["instance"] == _fill(path, seeded).split("?")[0]
    assert api.snapshot() == before
    assert api.queue.calls == []


def test_malformed_json_names_the_body_as_the_field(api: Api) -> None:
    response = api.client.post("/jobs", content=b'{"model_config": {', headers=JSON)
    assert_problem(response, 422, "invalid_json", "body")


def test_validation_problem_lists_every_error(api: Api) -> None:
    spec = recipe_spec("sample:medical_qa", learning_rate=-1, warmup_steps=-1)
    spec["lora_config"]["surprise"] = 1
    body = assert_problem(api.client.post("/jobs", json=spec), 422, "unknown_field", None)
    found = {(e["field"], e["code"]) for e in body["errors"]}
    assert found == {
        ("lora_config.surprise", "unknown_field"),
        ("training_config.learning_rate", "out_of_range"),
        ("training_config.warmup_steps", "out_of_range"),
    }
    assert api.queue.calls == []


def test_unknown_route_is_a_problem(api: Api) -> None:
    assert_problem(api.client.get("/nowhere"), 404, "not_found", None)


# --- GET /jobs ---------------------------------------------------------------------------------


def test_list_jobs_pages_newest_first(api: Api) -> None:
    ids = [api.create()["id"] for _ in range(7)]
    seen: list[str] = []
    pages: list[int] = []
    params: dict[str, Any] = {"limit": 3}
    while True:
        response = api.client.get("/jobs", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        assert page["object"] == "list"
        assert page["has_more"] is (page["next_cursor"] is not None)
        seen += [j["id"] for j in page["data"]]
        pages.append(len(page["data"]))
        if not page["has_more"]:
            break
        params["cursor"] = page["next_cursor"]
    assert pages == [3, 3, 1]
    assert seen == ids[::-1]


def test_list_jobs_status_filter(api: Api) -> None:
    ids = [api.create()["id"] for _ in range(3)]
    cancelled = api.client.post(f"/jobs/{ids[1]}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    page = api.client.get("/jobs", params={"status": "cancelled"}).json()
    assert [j["id"] for j in page["data"]] == [ids[1]]
    queued = api.client.get("/jobs", params={"status": "queued"}).json()
    assert [j["id"] for j in queued["data"]] == [ids[2], ids[0]]
    assert api.client.get("/jobs", params={"status": "running"}).json()["data"] == []


def test_list_jobs_empty(api: Api) -> None:
    page = api.client.get("/jobs").json()
    assert page == {"object": "list", "data": [], "has_more": False, "next_cursor": None}


# --- cancel, metrics, events -------------------------------------------------------------------


def test_cancel_of_a_running_job_is_requested(api: Api) -> None:
    job_id = api.create()["id"]
    with session_scope(api.db_url) as s:
        assert jobs.claim(s, job_id, worker="w")
    body = api.client.post(f"/jobs/{job_id}/cancel").json()
    assert (body["status"], body["cancel_requested"]) == ("running", True)
    assert body["finished_at"] is None


def test_metrics_pages(api: Api, seeded: dict[str, str]) -> None:
    url = f"/jobs/{seeded['finished']}/metrics"
    first = api.client.get(url, params={"limit": 2}).json()
    assert first["job_id"] == seeded["finished"] and first["status"] == "succeeded"
    assert [r["step"] for r in first["data"]] == [1, 2]
    assert first["has_more"] is True and first["last_step"] == 2
    assert first["data"][1]["loss"] == pytest.approx(1.0)
    rest = api.client.get(url, params={"after_step": first["last_step"]}).json()
    assert [r["step"] for r in rest["data"]] == [3, 4, 5]
    assert rest["has_more"] is False and rest["last_step"] == 5
    after_end = api.client.get(url, params={"after_step": 5}).json()
    assert after_end["data"] == [] and after_end["last_step"] is None
    empty = api.client.get(f"/jobs/{seeded['queued']}/metrics").json()
    assert empty["data"] == [] and empty["status"] == "queued"


@pytest.mark.timeout(30)  # a stream that never ends fails fast
def test_events_of_a_finished_job_stream_metrics_then_end(api: Api, seeded: dict[str, str]) -> None:
    url = f"/jobs/{seeded['finished']}/events?poll_seconds=0.05"
    events = list(sse(api.client, url))
    metrics = [(i, d["step"]) for i, e, d in events if e == "metric"]
    assert metrics == [(str(n), n) for n in range(1, 6)]
    kinds = [e for _, e, _ in events]
    assert kinds[-1] == "end" and kinds.count("end") == 1
    assert events[-1][2]["status"] == "succeeded"
    assert "status" in kinds


@pytest.mark.timeout(30)  # a stream that never ends fails fast
def test_events_resume_after_last_event_id(api: Api, seeded: dict[str, str]) -> None:
    url = f"/jobs/{seeded['finished']}/events?poll_seconds=0.05"
    events = list(sse(api.client, url, headers={"Last-Event-ID": "3"}))
    assert [d["step"] for _, e, d in events if e == "metric"] == [4, 5]
    assert events[-1][1] == "end"


# --- /infer ------------------------------------------------------------------------------------


def test_infer_with_the_base_model_on_a_queued_job_sends_one_task(
    api: Api, seeded: dict[str, str]
) -> None:
    response = api.client.post(
        "/infer",
        json={"job_id": seeded["queued"], "question": "Fever?", "use_adapter": False},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["answer"] == "Rest and fluids."
    assert body["adapter"] is False
    assert body["model"] == "smollm2-135m-instruct"
    assert len(api.queue.calls) == 1
    sent = api.queue.calls[0]
    assert sent.name == INFER_TASK
    # The answer comes back on the stream channel, not through Celery's result backend.
    assert sent.options["queue"] == INFER_QUEUE and sent.options["ignore_result"] is True
    assert "Fever" not in sent.options["argsrepr"] + sent.options["kwargsrepr"]
    assert sent.args == [
        seeded["queued"],
        [
            {"role": "system", "content": RECIPE_SYSTEM_PROMPT},
            {"role": "user", "content": "Fever?"},
        ],
    ]
    assert sent.kwargs is not None and sent.kwargs["use_adapter"] is False
    assert sent.kwargs["deltas"] is False and sent.kwargs["stream_id"].isalnum()
    # What the worker needs from the job row travels with the task: no job-store query there.
    assert sent.kwargs["job"] == {
        "base_model": "smollm2-135m-instruct",
        "status": "queued",
        "adapter_dir": None,
        "artifacts_dir": None,
        "load_in_4bit": True,
    }


def test_infer_streams_what_the_worker_sends(api: Api, seeded: dict[str, str]) -> None:
    response = api.client.post(
        "/infer", json={"job_id": seeded["finished"], "question": "Fever?", "stream": True}
    )
    assert response.status_code == 200, response.text
    events = [(e.event, e.data) for e in parse_sse(response.iter_lines())]
    assert [kind for kind, _ in events] == ["done"]
    assert events[0][1]["answer"] == "Rest and fluids." and events[0][1]["adapter"] is True
    sent = api.queue.calls[0]
    assert sent.options["queue"] == INFER_QUEUE and sent.options["ignore_result"] is True
    assert sent.kwargs is not None and "deltas" not in sent.kwargs  # a stream wants them
    assert sent.kwargs["job"]["status"] == "succeeded"


def test_infer_worker_error_becomes_a_problem(api: Api, seeded: dict[str, str]) -> None:
    api.queue.reply = {
        "error": {"status": 424, "code": "hub_unreachable", "detail": "offline", "field": None}
    }
    response = api.client.post("/infer", json={"job_id": seeded["finished"], "question": "Q?"})
    assert_problem(response, 424, "hub_unreachable", None)


# --- health and docs ---------------------------------------------------------------------------


def test_healthz(api: Api) -> None:
    response = api.client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "auth": "disabled"}


def test_healthz_reports_an_unreachable_database(tmp_path: Path) -> None:
    # A directory is not a database file: every connection attempt fails.
    broken = f"sqlite:///{tmp_path}"
    with make_client(broken, tmp_path / "home", FakeQueue()) as client:
        response = client.get("/healthz")
    assert_problem(response, 503, "database_unavailable", None)


def test_openapi_documents_the_endpoints(api: Api) -> None:
    response = api.client.get("/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    paths = schema["paths"]
    assert {"get", "post"} <= set(paths["/jobs"])
    assert "get" in paths["/jobs/{job_id}/metrics"]
    assert "get" in paths["/jobs/{job_id}/events"]
    assert (
        "text/event-stream" in paths["/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    )
    assert "post" in paths["/infer"]
    # The job spec is documented in the recipe's layout.
    ref = paths["/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    spec_schema = schema["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    assert {"model_config", "lora_config", "training_dataset", "training_config"} <= set(
        spec_schema["properties"]
    )
