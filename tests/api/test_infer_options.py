"""Decoding options on /infer travel to the worker; out-of-range ones are refused."""

from __future__ import annotations

from core.spec import RECIPE_SYSTEM_PROMPT
from tests.api.in_process import Api, assert_problem
from tests.api.in_process import api as api  # the in-process API fixture
from tests.api.in_process import seeded as seeded  # a fixture


def test_repetition_penalty_reaches_the_worker(api: Api, seeded: dict[str, str]) -> None:
    body = {"job_id": seeded["queued"], "question": "Fever?", "use_adapter": False}
    response = api.client.post("/infer", json={**body, "repetition_penalty": 1.15})
    assert response.status_code == 200, response.text
    sent = api.queue.calls[-1]
    assert sent.kwargs is not None and sent.kwargs["repetition_penalty"] == 1.15
    # 1.1 by default (greedy answers of a small tuned model loop without it: issue #20) ...
    assert api.client.post("/infer", json=body).status_code == 200
    assert (api.queue.calls[-1].kwargs or {})["repetition_penalty"] == 1.1
    # ... and 1.0 is plain greedy: nothing extra is sent.
    assert api.client.post("/infer", json={**body, "repetition_penalty": 1.0}).status_code == 200
    assert "repetition_penalty" not in (api.queue.calls[-1].kwargs or {})


def test_a_penalty_below_one_is_a_422(api: Api, seeded: dict[str, str]) -> None:
    response = api.client.post(
        "/infer",
        json={"job_id": seeded["queued"], "question": "Fever?", "repetition_penalty": 0.5},
    )
    assert_problem(response, 422, "out_of_range", "repetition_penalty")
    assert api.queue.calls == []


def test_messages_without_a_system_turn_get_the_jobs_prompt(
    api: Api, seeded: dict[str, str]
) -> None:
    """The adapter trained under the job's system prompt; without one, SmolLM2's template would
    insert its own default, a prompt the adapter never saw."""
    chat = [{"role": "user", "content": "Fever?"}]
    body = {"job_id": seeded["queued"], "messages": chat, "use_adapter": False}
    assert api.client.post("/infer", json=body).status_code == 200
    assert api.queue.calls[-1].args[1] == [
        {"role": "system", "content": RECIPE_SYSTEM_PROMPT},
        *chat,
    ]
    own = [{"role": "system", "content": "Be brief."}, *chat]
    assert api.client.post("/infer", json={**body, "messages": own}).status_code == 200
    assert api.queue.calls[-1].args[1] == own
