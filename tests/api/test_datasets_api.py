"""GET /jobs/{id}/dataset and POST /datasets/preview (the preview task run in-process)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core import jobs
from core.data.preview import PREVIEW_TASK
from core.db import session_scope
from core.queue import INFER_QUEUE
from core.settings import get_settings
from tests.api.test_api import Api, FakeResult, assert_problem
from tests.api.test_api import api as api  # the in-process API fixture


@pytest.fixture
def worker_queue(api: Api, model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    """The fake queue answers preview tasks by running the real task function here."""
    from worker.tasks import preview_task

    monkeypatch.setenv("MEDTUNE_MODEL_CACHE", str(model_cache))
    get_settings.cache_clear()
    original = api.queue.send_task

    def send_task(name: str, args: list[Any] | None = None, **options: Any) -> FakeResult:
        original(name, args, **options)
        return FakeResult(preview_task.run(*(args or [])))

    monkeypatch.setattr(api.queue, "send_task", send_task)
    yield api
    get_settings.cache_clear()


def preview_body(**dataset: Any) -> dict[str, Any]:
    return {
        "base_model": "smollm2-135m-instruct",
        "max_seq_length": 256,
        "training_dataset": {"name": "sample:medical_qa", **dataset},
        "count": 2,
    }


def test_preview_renders_tokens_with_trained_flags(worker_queue: Api) -> None:
    response = worker_queue.client.post("/datasets/preview", json=preview_body())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "dataset_preview"
    assert body["chat_template"] == "tokenizer" and body["end_of_turn_token"] == "<|im_end|>"
    assert body["problems"] == []
    assert [e["index"] for e in body["examples"]] == [0, 1]
    first = body["examples"][0]
    trained = "".join(t["piece"] for t in first["tokens"] if t["trained"])
    assert trained.endswith("<|im_end|>Ċ")  # byte-level pieces: Ċ is the newline
    assert first["trained_tokens"] == sum(t["trained"] for t in first["tokens"]) > 0
    assert not first["tokens"][0]["trained"]
    assert "<|im_start|>assistant" in first["text"]
    sent = worker_queue.queue.calls[-1]
    assert sent.name == PREVIEW_TASK and sent.options == {"queue": INFER_QUEUE}


def test_preview_lists_gate_problems_instead_of_failing(worker_queue: Api) -> None:
    # Llama 3's template on SmolLM2's vocabulary: its <|eot_id|> is plain text there.
    response = worker_queue.client.post(
        "/datasets/preview", json=preview_body(chat_template="llama3")
    )
    assert response.status_code == 200, response.text
    problems = response.json()["problems"]
    assert problems and problems[0]["code"] == "eot_missing"
    assert problems[0]["example_index"] == 0


def test_preview_of_a_missing_dataset_is_refused_before_queueing(
    worker_queue: Api, tmp_path: Path
) -> None:
    body = preview_body()
    body["training_dataset"]["name"] = str(tmp_path / "nowhere" / "qa.jsonl")
    response = worker_queue.client.post("/datasets/preview", json=body)
    assert_problem(response, 422, "dataset_not_found", "training_dataset.name")
    assert worker_queue.queue.calls == []


def test_preview_worker_error_is_a_problem(worker_queue: Api, tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("Q,A\nq,a\n", encoding="utf-8")
    body = preview_body(columns={"question": "question", "answer": "A"})
    body["training_dataset"]["name"] = str(path)
    response = worker_queue.client.post("/datasets/preview", json=body)
    assert_problem(response, 422, "dataset_columns", "training_dataset.columns.question")


def test_preview_rejects_unknown_keys(api: Api) -> None:
    body = {**preview_body(), "epochs": 3}
    assert_problem(api.client.post("/datasets/preview", json=body), 422, "unknown_field", "epochs")
    assert api.queue.calls == []


def test_job_dataset_stats(api: Api) -> None:
    job = api.create()
    assert_problem(api.client.get(f"/jobs/{job['id']}/dataset"), 409, "dataset_not_ready", "job_id")
    stats = {"examples": 8, "length_p50": 120, "dropped": {"empty_answer": 1}}
    with session_scope(api.db_url) as s:
        assert jobs.claim(s, job["id"], worker="test")
        jobs.set_fields(s, job["id"], dataset_stats=stats)
    response = api.client.get(f"/jobs/{job['id']}/dataset")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["stats"] == stats and body["status"] == "running"
    assert body["dataset"]["name"] == "sample:medical_qa"
    assert body["dataset"]["chat_template"] == "auto"
    assert_problem(api.client.get("/jobs/job_nope/dataset"), 404, "job_not_found", None)
