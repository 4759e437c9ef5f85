"""/v1/chat/completions and /v1/models in-process: model resolution, owners, shapes, errors.

The worker is a fake queue here; tests/api/test_infer_live.py runs the real one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.queue import INFER_QUEUE, INFER_TASK
from core.store.db import session_scope
from core.store.models import Job, JobStatus
from tests.api.in_process import FakeQueue
from tests.api.test_auth import bearer, build, new_key
from tests.helpers import recipe_spec

PROBLEM = "application/problem+json"


class Keys:
    def __init__(self, db_url: str, client: TestClient, queue: FakeQueue) -> None:
        self.db_url, self.client, self.queue = db_url, client, queue
        self.alice = new_key(db_url, name="alice")[1]
        self.bob = new_key(db_url, name="bob")[1]

    def job(self, key: str, *, name: str, succeeded: bool = True) -> str:
        spec = recipe_spec("sample:medical_qa")
        spec["model_config"]["finetuned_model"] = name
        response = self.client.post("/jobs", json=spec, headers=bearer(key))
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        if succeeded:
            with session_scope(self.db_url) as s:
                job = s.get(Job, job_id)
                assert job is not None
                job.status, job.adapter_dir = JobStatus.succeeded, "/srv/adapter"
                s.add(job)
                s.commit()
        self.queue.calls.clear()
        return str(job_id)

    def chat(self, key: str, **body: Any) -> Any:
        payload = {"messages": [{"role": "user", "content": "Fever?"}], **body}
        return self.client.post("/v1/chat/completions", json=payload, headers=bearer(key))


@pytest.fixture
def keys(sqlite_url: str, tmp_path: Path) -> Iterator[Keys]:
    queue = FakeQueue()
    with TestClient(build(sqlite_url, tmp_path / "home", queue)) as client:
        yield Keys(sqlite_url, client, queue)


def assert_problem(response: Any, status: int, code: str, field: str | None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["code"] == code and body.get("field") == field, body


def test_a_job_id_answers_as_a_chat_completion(keys: Keys) -> None:
    job_id = keys.job(keys.alice, name="smol-med")
    response = keys.chat(keys.alice, model=job_id, max_tokens=32, temperature=0, stop="\n\n")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == job_id and isinstance(body["created"], int)
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Rest and fluids."},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    assert body["usage"] == {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24}
    (sent,) = keys.queue.calls
    # As /infer: the answer comes back on the stream channel, not through the result backend,
    # and the question stays out of the task's headers.
    assert sent.name == INFER_TASK
    assert sent.options["queue"] == INFER_QUEUE and sent.options["ignore_result"] is True
    assert "Fever" not in sent.options["argsrepr"] + sent.options["kwargsrepr"]
    assert sent.args == [job_id, [{"role": "user", "content": "Fever?"}]]
    assert sent.kwargs is not None
    stream_id, job = sent.kwargs.pop("stream_id"), sent.kwargs.pop("job")
    assert stream_id.isalnum()
    # The job's fields travel with the task: the worker reads nothing from the job store.
    assert job["status"] == "succeeded" and job["adapter_dir"] == "/srv/adapter"
    assert sent.kwargs == {
        "use_adapter": True,
        "max_new_tokens": 32,
        "temperature": 0.0,
        "top_p": 1.0,
        "stop": ["\n\n"],
        "deltas": False,
    }


def test_model_names_resolve_to_the_newest_job_or_a_base(keys: Keys) -> None:
    keys.job(keys.alice, name="smol-med")
    newer = keys.job(keys.alice, name="smol-med")
    keys.job(keys.alice, name="smol-med", succeeded=False)  # not a model yet
    assert keys.chat(keys.alice, model="smol-med").status_code == 200
    assert keys.queue.calls[-1].args[0] == newer
    base = keys.chat(
        keys.alice,
        model="smollm2-135m-instruct",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Fe"}, {"type": "text", "text": "ver?"}],
            },
        ],
    )
    assert base.status_code == 200, base.text
    sent = keys.queue.calls[-1]
    assert sent.args == [
        None,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Fever?"}],
    ]
    assert sent.kwargs is not None
    assert sent.kwargs["use_adapter"] is False
    assert sent.kwargs["base_model"] == "smollm2-135m-instruct"
    assert sent.kwargs["temperature"] == 1.0  # OpenAI's default
    assert sent.kwargs["max_new_tokens"] == 256


def test_another_keys_models_are_not_found(keys: Keys) -> None:
    job_id = keys.job(keys.alice, name="alice-med")
    for model in (job_id, "alice-med", "no-such-model"):
        assert_problem(keys.chat(keys.bob, model=model), 404, "model_not_found", "model")
    assert keys.queue.calls == []
    listed = keys.client.get("/v1/models", headers=bearer(keys.bob)).json()
    assert [m["id"] for m in listed["data"]] == ["smollm2-135m-instruct"]


def test_models_lists_bases_and_own_succeeded_jobs(keys: Keys) -> None:
    done = keys.job(keys.alice, name="alice-med")
    keys.job(keys.alice, name="alice-wip", succeeded=False)
    keys.job(keys.bob, name="bob-med")
    response = keys.client.get("/v1/models", headers=bearer(keys.alice))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["smollm2-135m-instruct", done]
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in body["data"])
    tuned = body["data"][1]
    assert tuned["finetuned_model"] == "alice-med" and tuned["parent"] == "smollm2-135m-instruct"


def test_a_job_that_has_not_succeeded_is_not_ready(keys: Keys) -> None:
    job_id = keys.job(keys.alice, name="wip", succeeded=False)
    assert_problem(keys.chat(keys.alice, model=job_id), 409, "job_not_ready", "model")


def test_worker_errors_name_the_model_field(keys: Keys) -> None:
    job_id = keys.job(keys.alice, name="smol-med")
    keys.queue.reply = {
        "error": {"status": 409, "code": "adapter_missing", "detail": "gone", "field": "job_id"}
    }
    assert_problem(keys.chat(keys.alice, model=job_id), 409, "adapter_missing", "model")
    keys.queue.reply = {
        "error": {
            "status": 400,
            "code": "context_length_exceeded",
            "detail": "too long",
            "field": "max_new_tokens",
        }
    }
    too_long = keys.chat(keys.alice, model=job_id, max_tokens=4000)
    assert_problem(too_long, 400, "context_length_exceeded", "max_tokens")


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"n": 2}, "invalid_choice", "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "invalid_value", "stop"),
        ({"messages": [{"role": "assistant", "content": "Hi"}]}, "invalid_value", "messages"),
        ({"messages": []}, "out_of_range", "messages"),
        ({"max_tokens": 0}, "out_of_range", "max_tokens"),
        ({"temperature": 3}, "out_of_range", "temperature"),
        ({"logit_bias": {"1": 2}}, "unknown_field", "logit_bias"),
    ],
)
def test_bad_requests_are_problems(keys: Keys, body: dict, code: str, field: str) -> None:
    job_id = keys.job(keys.alice, name="smol-med")
    assert_problem(keys.chat(keys.alice, model=job_id, **body), 422, code, field)
    assert keys.queue.calls == []


def test_the_routes_need_a_key(keys: Keys) -> None:
    assert keys.client.get("/v1/models").status_code == 401
    response = keys.client.post(
        "/v1/chat/completions",
        json={"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert_problem(response, 401, "unauthorized", "Authorization")


def test_a_problem_has_one_title_wherever_it_was_raised(keys: Keys) -> None:
    """An error the worker raised reaches the API as a plain MedtuneError; its title comes from
    its code, as for the same code raised in the API."""
    job_id = keys.job(keys.alice, name="smol-med")
    keys.queue.reply = {
        "error": {"status": 404, "code": "job_not_found", "detail": "gone", "field": "job_id"}
    }
    from_worker = keys.chat(keys.alice, model=job_id).json()
    in_api = keys.client.get("/jobs/job_nope", headers={"Authorization": f"Bearer {keys.alice}"})
    assert from_worker["title"] == in_api.json()["title"] == "Job not found"
