"""Which system text an example gets: the row's own, or the job's (system_prompt_source)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.data.conversations import to_examples
from core.data.prepare import prepare
from core.spec import DatasetSection

JOB = "Answer as a physician."
ALPACA = [
    {"instruction": "You are a cardiologist.", "input": "What is angina?", "output": "Chest pain."},
    {"instruction": "", "input": "What is a stroke?", "output": "A brain attack."},
    {"input": "What is sepsis?", "output": "A response to infection."},
    {"instruction": "Define anemia.", "input": "", "output": "Too few red cells."},
]


def turns(rows: list[dict[str, Any]], mode: str) -> tuple[list[list[tuple[str, str]]], Any]:
    conv = to_examples(rows, system_prompt=JOB, input_field="prompt", system_prompt_source=mode)
    out = [[(m["role"], m["content"]) for m in e.messages or []] for e in conv.examples]
    return out[:], conv.system_from


def test_row_mode_keeps_the_instruction_as_system_and_fills_in_the_jobs_prompt() -> None:
    examples, used = turns(ALPACA, "row")
    assert [e[0] for e in examples] == [
        ("system", "You are a cardiologist."),
        ("system", JOB),  # input/output rows without an instruction: the job's prompt
        ("system", JOB),
        ("system", JOB),
    ]
    assert [e[1] for e in examples] == [
        ("user", "What is angina?"),
        ("user", "What is a stroke?"),
        ("user", "What is sepsis?"),
        ("user", "Define anemia."),
    ]
    assert used == {"row": 1, "job": 3}


def test_job_mode_puts_the_jobs_prompt_on_every_row_and_the_instruction_in_the_question() -> None:
    examples, used = turns(ALPACA, "job")
    assert all(e[0] == ("system", JOB) for e in examples)
    assert examples[0][1] == ("user", "You are a cardiologist.\n\nWhat is angina?")
    assert examples[3][1] == ("user", "Define anemia.")
    assert used == {"job": 4}


@pytest.mark.parametrize(("mode", "system"), [("row", "Be terse."), ("job", JOB)])
def test_a_system_column_and_a_system_turn_follow_the_mode(mode: str, system: str) -> None:
    qa = [{"question": "Q?", "answer": "A.", "system": "Be terse."}]
    assert turns(qa, mode)[0][0][0] == ("system", system)
    chat = [
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Q?"},
                {"role": "assistant", "content": "A."},
            ]
        }
    ]
    examples, _ = turns(chat, mode)
    assert examples[0] == [("system", system), ("user", "Q?"), ("assistant", "A.")]


def test_an_empty_job_prompt_leaves_rows_without_their_own_with_no_system_turn() -> None:
    conv = to_examples(ALPACA, system_prompt="", input_field="prompt")
    assert conv.system_from == {"row": 1, "none": 3}
    assert conv.examples[1].messages[0]["role"] == "user"  # type: ignore[index]


def test_the_dataset_stats_say_which_applied(tmp_path: Path, tokenizer: Any) -> None:
    rows = [
        {"instruction": "You are a nurse." if i % 4 == 0 else "", "input": f"Q{i}?", "output": "A."}
        for i in range(20)
    ]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    for mode, expected in [("row", {"row": 5, "job": 15}), ("job", {"row": 0, "job": 20})]:
        section = DatasetSection(
            name=str(path), system_prompt=JOB, system_prompt_source=mode, dedupe="none"
        )
        stats = prepare(section, tokenizer, max_seq_length=256).stats
        assert stats["system_prompt"] == {"source": mode, "none": 0, **expected}
