"""POST /datasets/preview for dpo / orpo (#19): preference pairs as the trainer takes them, the
gate's findings, and the refusals a preference job would get (the preview task run in-process)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.data.preference import ANSWER_FIELD, PROMPT_FIELD
from core.data.sources import sample_path
from tests.api.in_process import Api, assert_problem
from tests.api.in_process import api as api  # the in-process API fixture
from tests.api.test_datasets_api import worker_queue as worker_queue  # the preview task here
from tests.helpers import tiny_dataset

PAIRS = "sample:medical_preference"


def body(method: str, name: str | Path = PAIRS, **extra: Any) -> dict[str, Any]:
    return {
        "base_model": "smollm2-135m-instruct",
        "max_seq_length": 256,
        "training_dataset": {"name": str(name)},
        "count": 2,
        "method": method,
        **extra,
    }


def first_rows(count: int) -> list[dict[str, Any]]:
    lines = sample_path(PAIRS).read_text(encoding="utf-8").splitlines()[:count]
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_a_preference_preview_shows_prompt_chosen_and_rejected_as_trained(
    worker_queue: Api, method: str
) -> None:
    response = worker_queue.client.post("/datasets/preview", json=body(method))
    assert response.status_code == 200, response.text
    preview = response.json()
    assert preview["method"] == method and preview["layout"] == "preference"
    assert preview["examples"] == [] and preview["problems"] == []
    assert preview["end_of_turn_token"] == "<|im_end|>"
    # Half of max_seq_length each, the defaults of training_config.preference.
    assert (preview["max_prompt_length"], preview["max_completion_length"]) == (128, 128)
    assert [p["index"] for p in preview["pairs"]] == [0, 1]
    for pair, row in zip(preview["pairs"], first_rows(2), strict=True):
        # The prompt ends where the answer starts: the assistant header is the prompt's.
        assert row["prompt"] in pair["prompt"]
        assert pair["prompt"].endswith("<|im_start|>assistant\n")
        assert pair["chosen"] == row["chosen"] + "<|im_end|>"
        assert pair["rejected"] == row["rejected"] + "<|im_end|>"
        assert not pair["truncated"] and pair["cut_by"] is None
        for part in ("prompt", "chosen", "rejected"):
            assert pair[f"{part}_tokens"] == pair[f"{part}_length"] > 0
        assert pair["meta"]["row"] == pair["index"]


def test_pairs_cut_by_the_budgets_are_shown_cut_and_the_gate_says_so(worker_queue: Api) -> None:
    budgets = {"max_prompt_length": 8, "max_completion_length": 100}
    response = worker_queue.client.post("/datasets/preview", json=body("dpo", preference=budgets))
    assert response.status_code == 200, response.text
    preview = response.json()
    assert (preview["max_prompt_length"], preview["max_completion_length"]) == (8, 100)
    first = preview["pairs"][0]
    assert first["truncated"] and first["cut_by"] == PROMPT_FIELD
    assert first["prompt_tokens"] == 8 < first["prompt_length"]
    assert first["prompt"].endswith("<|im_start|>assistant\n")  # the prompt keeps its end
    assert [p["code"] for p in preview["problems"]] == ["too_many_truncated"]
    assert preview["problems"][0]["field"] == PROMPT_FIELD

    short_answers = {"max_prompt_length": 100, "max_completion_length": 4}
    response = worker_queue.client.post(
        "/datasets/preview", json=body("orpo", preference=short_answers)
    )
    pair = response.json()["pairs"][0]
    assert pair["cut_by"] == ANSWER_FIELD and pair["chosen_tokens"] == 4
    assert first_rows(1)[0]["chosen"].startswith(pair["chosen"])  # an answer keeps its start


def test_sft_rows_previewed_as_dpo_get_the_code_the_job_would(
    worker_queue: Api, tmp_path: Path
) -> None:
    # A file: refused before queueing, as POST /jobs refuses it.
    qa = tiny_dataset(tmp_path / "qa.jsonl")
    response = worker_queue.client.post("/datasets/preview", json=body("dpo", qa))
    detail = assert_problem(response, 422, "dataset_not_preference", "training_dataset.name")
    assert "chosen and rejected" in detail["detail"]
    response = worker_queue.client.post("/datasets/preview", json=body("orpo", "sample:medical_qa"))
    assert_problem(response, 422, "dataset_not_preference", "training_dataset.name")
    assert worker_queue.queue.calls == []
    # A folder is read by the worker only: the same problem comes back from it.
    folder = tmp_path / "qa"
    folder.mkdir()
    tiny_dataset(folder / "qa.jsonl")
    response = worker_queue.client.post("/datasets/preview", json=body("dpo", folder))
    assert_problem(response, 422, "dataset_not_preference", "training_dataset.name")
    assert len(worker_queue.queue.calls) == 1
    # And the same file previewed for sft renders.
    response = worker_queue.client.post("/datasets/preview", json=body("sft", qa))
    assert response.status_code == 200, response.text
    assert response.json()["method"] == "sft" and response.json()["pairs"] == []


def test_settings_a_preference_job_refuses_are_refused_naming_the_preview_field(
    api: Api,
) -> None:
    text = body("dpo")
    text["training_dataset"]["format"] = "text"
    problem = assert_problem(
        api.client.post("/datasets/preview", json=text), 422, "method_conflict", "method"
    )
    assert 'training_dataset.format "text"' in problem["detail"]
    too_long = body("orpo", preference={"max_prompt_length": 200, "max_completion_length": 100})
    problem = assert_problem(
        api.client.post("/datasets/preview", json=too_long), 422, "method_conflict", "method"
    )
    assert "preference.max_prompt_length (200)" in problem["detail"]
    assert "max_seq_length (256)" in problem["detail"]
    assert "training_config" not in problem["detail"] and "model_config" not in problem["detail"]
    sft_knob = body("sft", preference={"beta": 0.2})
    problem = assert_problem(
        api.client.post("/datasets/preview", json=sft_knob), 422, "method_conflict", "preference"
    )
    assert "set method to 'dpo' or 'orpo'" in problem["detail"]
    loss = body("orpo", preference={"loss_type": "ipo"})
    assert_problem(
        api.client.post("/datasets/preview", json=loss), 422, "method_conflict", "preference"
    )
    assert_problem(
        api.client.post("/datasets/preview", json=body("kto")), 422, "invalid_choice", "method"
    )
    assert api.queue.calls == []
