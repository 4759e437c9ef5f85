"""Preference data (dpo, orpo): the row layouts, the pairs' tokens, the gate and the split."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from core.data.gate import DatasetGateError
from core.data.preference import (
    ANSWER_FIELD,
    PROMPT_FIELD,
    encode_pair,
    prepare_job,
    prepare_pairs,
)
from core.data.preference_rows import NOT_PREFERENCE, to_pairs
from core.data.prepare import Prepared
from core.errors import DatasetError
from core.spec import RECIPE_SYSTEM_PROMPT, JobSpec
from tests.helpers import ROOT, recipe_spec

SAMPLE = ROOT / "core" / "samples" / "medical_preference_sample.jsonl"
QUESTION, GOOD, BAD = "Is a fever of 38.5 C dangerous?", "Usually not; watch for...", "Always."
USER = {"role": "user", "content": QUESTION}


def spec(name: str, **training: Any) -> JobSpec:
    raw = recipe_spec(name, method=training.pop("method", "dpo"), **training)
    return JobSpec.model_validate(raw)


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": QUESTION, "chosen": GOOD, "rejected": BAD},
        {"question": QUESTION, "chosen": GOOD, "rejected": BAD},
        {"messages": [USER], "chosen": [{"role": "assistant", "content": GOOD}], "rejected": BAD},
        {  # TRL's implicit prompt: two whole conversations
            "chosen": [USER, {"role": "assistant", "content": GOOD}],
            "rejected": [USER, {"role": "assistant", "content": BAD}],
        },
        {  # OpenAI's preference file, as is
            "input": {"messages": [USER]},
            "preferred_output": [{"role": "assistant", "content": GOOD}],
            "non_preferred_output": [{"role": "assistant", "content": BAD}],
        },
        {"prompt": json.dumps([USER]), "chosen": GOOD, "rejected": BAD},  # a CSV cell
    ],
)
def test_every_layout_is_the_same_pair(row: dict[str, Any]) -> None:
    pairs = to_pairs([row], system_prompt=RECIPE_SYSTEM_PROMPT)
    (pair,) = pairs.pairs
    assert pair.prompt == [{"role": "system", "content": RECIPE_SYSTEM_PROMPT}, USER]
    assert (pair.chosen, pair.rejected) == (GOOD, BAD)
    assert pairs.system_from == {"job": 1}


def test_a_rows_own_system_turn_is_kept_unless_the_job_says_otherwise() -> None:
    row = {"messages": [{"role": "system", "content": "Be brief."}, USER], "chosen": GOOD}
    row["rejected"] = BAD
    (own,) = to_pairs([row], system_prompt="Job.").pairs
    assert own.prompt[0] == {"role": "system", "content": "Be brief."}
    (job,) = to_pairs([row], system_prompt="Job.", system_prompt_source="job").pairs
    assert job.prompt[0] == {"role": "system", "content": "Job."}


def test_sft_rows_are_refused_naming_the_columns_a_preference_job_needs() -> None:
    with pytest.raises(DatasetError) as info:
        to_pairs([{"question": QUESTION, "answer": GOOD}], system_prompt="")
    error = info.value
    assert (error.code, error.field) == (NOT_PREFERENCE, "training_dataset.name")
    for needed in ("prompt (or messages), chosen and rejected", "preferred_output", "'sft'"):
        assert needed in error.detail


def test_pairs_that_teach_nothing_are_dropped_and_counted() -> None:
    rows = [
        {"prompt": QUESTION, "chosen": GOOD, "rejected": BAD},
        {"prompt": QUESTION, "chosen": GOOD, "rejected": GOOD},
        {"prompt": QUESTION, "chosen": GOOD, "rejected": "  "},
        {"prompt": "", "chosen": GOOD, "rejected": BAD},
        {
            "messages": [USER, {"role": "assistant", "content": "x"}],
            "chosen": GOOD,
            "rejected": BAD,
        },
    ]
    pairs = to_pairs(rows, system_prompt="")
    assert [p.meta["row"] for p in pairs.pairs] == [0]
    assert pairs.dropped == {
        "chosen_equals_rejected": 1,
        "empty_rejected": 1,
        "empty_prompt": 1,
        "prompt_not_ending_with_user_turn": 1,
    }


def test_a_pair_is_the_chat_template_split_where_the_answer_starts(tokenizer: Any) -> None:
    (pair,) = to_pairs(
        [{"prompt": QUESTION, "chosen": GOOD, "rejected": BAD}], system_prompt="S"
    ).pairs
    item = encode_pair(tokenizer, pair, prompt_budget=512, answer_budget=512)
    prompt_text = tokenizer.apply_chat_template(
        pair.prompt, tokenize=False, add_generation_prompt=True
    )
    assert item.prompt_ids == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for answer, ids in ((GOOD, item.chosen_ids), (BAD, item.rejected_ids)):
        whole = tokenizer.apply_chat_template(
            [*pair.prompt, {"role": "assistant", "content": answer}], tokenize=False
        )
        # The answer ends with its end-of-turn token; ChatML's newline after it is not scored.
        expected = tokenizer(whole, add_special_tokens=False)["input_ids"]
        assert item.prompt_ids + ids == expected[: expected.index(eot, len(item.prompt_ids)) + 1]
        assert ids[-1] == eot and tokenizer.decode(ids[:-1]).strip() == answer
    cut = encode_pair(tokenizer, pair, prompt_budget=4, answer_budget=512)
    assert cut.prompt_ids == item.prompt_ids[-4:]  # the prompt keeps its end: the question
    assert cut.cut == PROMPT_FIELD and cut.prompt_length == len(item.prompt_ids)
    cut = encode_pair(tokenizer, pair, prompt_budget=512, answer_budget=3)
    assert cut.chosen_ids == item.chosen_ids[:3] and cut.cut == ANSWER_FIELD


def test_the_shipped_sample_passes_the_gate_and_splits(tokenizer: Any) -> None:
    job = spec("sample:medical_preference")
    job.dataset.validation_share = 0.1
    prepared = prepare_pairs(job, tokenizer)
    rows = len(SAMPLE.read_text().splitlines())
    assert rows >= 40 and len(prepared.train) + len(prepared.validation) == rows
    assert len(prepared.validation) == round(0.1 * rows)
    stats = prepared.stats
    assert stats["gate"]["passed"] and stats["truncated"] == 0 and stats["layout"] == "preference"
    assert stats["validation"]["kind"] == "validation_share"
    assert stats["examples"] == len(prepared.train) == len(prepared.examples)
    # Evaluation asks each held-out prompt and scores against the chosen answer.
    first = prepared.validation_examples[0].messages
    assert first is not None and first[-1]["role"] == "assistant"
    assert isinstance(prepare_job(spec("sample:medical_qa", method="sft"), tokenizer), Prepared)


def test_answers_cut_by_the_budget_fail_the_gate_naming_the_budget(tokenizer: Any) -> None:
    job = spec("sample:medical_preference", preference={"max_completion_length": 16})
    with pytest.raises(DatasetGateError) as info:
        prepare_pairs(job, tokenizer)
    error = info.value
    assert (error.code, error.field) == ("too_many_truncated", ANSWER_FIELD)
    assert error.dataset_stats is not None and not error.dataset_stats["gate"]["passed"]


def test_csv_with_renamed_columns_and_an_openai_validation_file(
    tmp_path: Path, tokenizer: Any
) -> None:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    train = tmp_path / "pairs.csv"
    with train.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["q", "good", "bad"])
        writer.writeheader()
        for row in rows[:30]:
            writer.writerow({"q": row["prompt"], "good": row["chosen"], "bad": row["rejected"]})
    held = tmp_path / "held.jsonl"
    openai = [
        {
            "input": {"messages": [{"role": "user", "content": r["prompt"]}]},
            "preferred_output": [{"role": "assistant", "content": r["chosen"]}],
            "non_preferred_output": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in rows[28:34]  # two of them are training pairs too
    ]
    held.write_text("\n".join(json.dumps(r) for r in openai) + "\n")
    raw = recipe_spec(str(train), method="orpo")
    raw["training_dataset"]["rename_columns"] = {"q": "prompt", "good": "chosen", "bad": "rejected"}
    raw["validation_dataset"] = {"name": str(held)}
    prepared = prepare_pairs(JobSpec.model_validate(raw), tokenizer)
    assert len(prepared.train) == 30 and len(prepared.validation) == 4
    assert prepared.stats["validation"]["layout"] == "openai"
    assert prepared.stats["validation"]["dropped"] == {"duplicate": 2}
