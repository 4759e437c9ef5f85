"""GET /jobs/{id}/dataset and POST /datasets/preview (the preview task run in-process)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.pipeline import run_job
from core.queue import INFER_QUEUE, PREVIEW_TASK
from core.settings import Settings, get_settings
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from tests.api.in_process import Api, FakeResult, assert_problem
from tests.api.in_process import api as api  # the in-process API fixture
from tests.helpers import recipe_spec


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
    # The answer ends on its end-of-turn token; the newline the template writes after it is
    # framing, not trained (generation stops before it).
    assert trained.endswith("<|im_end|>")
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


# --- mixes --------------------------------------------------------------------------------------


def qa_jsonl(path: Path, prefix: str, count: int) -> Path:
    rows = [{"question": f"{prefix} {i}?", "answer": f"{prefix} answer {i}."} for i in range(count)]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


def mix_spec(*sources: dict[str, Any], **dataset: Any) -> dict[str, Any]:
    spec = recipe_spec("sample:medical_qa")
    spec["training_dataset"] = {"sources": list(sources), **dataset}
    return spec


def test_job_with_a_bad_mix_is_refused_naming_the_field(api: Api, tmp_path: Path) -> None:
    good = {"name": "sample:medical_qa"}
    bad_weight = mix_spec(good, {"name": "sample:medical_qa", "weight": 0})
    assert_problem(
        api.client.post("/jobs", json=bad_weight),
        422,
        "out_of_range",
        "training_dataset.sources[1].weight",
    )
    assert_problem(
        api.client.post("/jobs", json=mix_spec()), 422, "out_of_range", "training_dataset.sources"
    )
    missing = mix_spec(good, {"name": str(tmp_path / "nowhere.jsonl")})
    body = assert_problem(
        api.client.post("/jobs", json=missing),
        422,
        "dataset_not_found",
        "training_dataset.sources[1].name",
    )
    assert "source 1" in body["detail"]
    assert api.queue.calls == []
    created = api.client.post(
        "/jobs", json=mix_spec(good, {"name": "sample:medical_qa", "weight": 2})
    )
    assert created.status_code == 201, created.text


def test_preview_of_a_mix_tags_each_example_with_its_source(
    worker_queue: Api, tmp_path: Path
) -> None:
    a = qa_jsonl(tmp_path / "a.jsonl", "alpha", 8)
    b = qa_jsonl(tmp_path / "b.jsonl", "beta", 8)
    body = preview_body()
    body["training_dataset"] = {"sources": [{"name": str(a), "weight": 3}, {"name": str(b)}]}
    body["count"] = 8
    response = worker_queue.client.post("/datasets/preview", json=body)
    assert response.status_code == 200, response.text
    examples = response.json()["examples"]
    assert len(examples) == 8 and response.json()["problems"] == []
    assert {e["meta"]["dataset"] for e in examples} <= {str(a), str(b)}
    assert {e["meta"]["dataset_index"] for e in examples} == {0, 1}


def test_a_job_the_gate_fails_keeps_its_dataset_stats(
    api: Api, tmp_path: Path, model_cache: Path
) -> None:
    a = qa_jsonl(tmp_path / "a.jsonl", "alpha", 4)
    b = qa_jsonl(tmp_path / "b.jsonl", "beta", 4)
    # Llama 3's template on SmolLM2's vocabulary: its <|eot_id|> is plain text, the gate refuses.
    spec = mix_spec({"name": str(a)}, {"name": str(b)}, chat_template="llama3")
    with session_scope(api.db_url) as s:
        job_id = jobs.create_job(s, JobSpec.model_validate(spec)).id
    settings = Settings(home=tmp_path / "home", database_url=api.db_url, model_cache=model_cache)
    assert run_job(job_id, settings, worker="w") == JobStatus.failed
    response = api.client.get(f"/jobs/{job_id}/dataset")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "failed"
    stats = body["stats"]
    assert (
        stats["gate"]["passed"] is False and stats["gate"]["problems"][0]["code"] == "eot_missing"
    )
    assert [(s["name"], s["taken"]) for s in stats["sources"]] == [(str(a), 4), (str(b), 4)]
    assert stats["examples"] == 8
    job = api.client.get(f"/jobs/{job_id}").json()
    assert job["error"]["code"] == "eot_missing"
