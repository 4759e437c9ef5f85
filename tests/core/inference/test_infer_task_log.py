"""What the inference task returns is what Celery logs ("Task ... succeeded: <value>"): once the
answer went out on the stream channel, the task returns only its shape, never the text."""

from __future__ import annotations

from typing import Any

import pytest

import worker.tasks as tasks

ANSWER = {
    "answer": "Iron deficiency anemia is treated with iron supplements.",
    "finish_reason": "stop",
    "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29},
    "backend": "llama_cpp",
}


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def fake_serve(engine: Any, build: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(kwargs)
        return dict(ANSWER)

    monkeypatch.setattr(tasks, "serve", fake_serve)
    monkeypatch.setattr(tasks, "_engine", lambda: None)
    monkeypatch.setattr(tasks, "channel_for", lambda settings: "channel")
    return calls


def test_a_streamed_answer_is_not_returned(served: list[dict[str, Any]]) -> None:
    result = tasks.infer_task.run("job_1", [{"role": "user", "content": "Anemia?"}], stream_id="s1")
    assert served[0]["stream_id"] == "s1" and served[0]["channel"] == "channel"
    assert "answer" not in result and "Anemia" not in repr(result)
    assert result == {key: ANSWER[key] for key in ("finish_reason", "usage", "backend")}


def test_without_a_stream_the_answer_is_the_result(served: list[dict[str, Any]]) -> None:
    """An API that reads Celery's result backend (no stream) still gets the whole answer."""
    result = tasks.infer_task.run("job_1", [{"role": "user", "content": "Anemia?"}])
    assert result == ANSWER and served[0]["channel"] is None
