"""Turn heterogeneous rows into chat conversations (a list of role/content messages)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from core.data.cleaning import clean_text
from core.data.example import Example
from core.data.sources import Row
from core.errors import DatasetError

QUESTION_KEYS = ("question", "query", "prompt_text")
ANSWER_KEYS = ("answer", "response", "completion")
# Row columns kept on an example as metadata (MedQuAD's question type and focus, its collection).
META_KEYS = ("qtype", "focus", "source", "document")
ROLES = ("system", "user", "assistant")


@dataclass
class Conversion:
    examples: list[Example]
    dropped: Counter[str] = field(default_factory=Counter)
    layout: str = ""


def _text(value: Any) -> str:
    return clean_text(value)


def _first(row: Row, keys: tuple[str, ...]) -> str:
    for key in keys:
        if key in row:
            return _text(row[key])
    return ""


def detect_layout(row: Row, input_field: str) -> str:
    if isinstance(row.get("messages"), list):
        return "messages"
    if "output" in row and ("instruction" in row or "input" in row):
        return "alpaca"
    if any(k in row for k in QUESTION_KEYS) and any(k in row for k in ANSWER_KEYS):
        return "qa"
    if input_field in row:
        return "text"
    raise DatasetError(
        f"rows have columns {sorted(row)[:12]}, none that medtune can train on: give "
        "instruction/input/output, question/answer, a 'messages' list, or name a text column in "
        "training_dataset.input_field",
        field="training_dataset.input_field",
        code="dataset_columns",
    )


def to_examples(rows: list[Row], *, system_prompt: str, input_field: str) -> Conversion:
    """Map rows to conversations; rows with an empty question or answer are dropped and counted.

    Alpaca rows: when ``input`` is set, ``instruction`` is the system text and ``input`` the user
    turn (the layout of the recipe's medical sets); otherwise ``instruction`` is the user turn.
    """
    layout = detect_layout(rows[0], input_field)
    conv = Conversion(examples=[], layout=layout)
    for index, row in enumerate(rows):
        example = _convert(row, layout, system_prompt=system_prompt, input_field=input_field)
        if isinstance(example, str):
            conv.dropped[example] += 1
        else:
            example.meta = {"row": index, **{k: row[k] for k in META_KEYS if row.get(k)}}
            conv.examples.append(example)
    if not conv.examples:
        raise DatasetError(
            f"every row was dropped ({dict(conv.dropped)}); check the column names",
            field="training_dataset",
            code="dataset_empty",
        )
    return conv


def _convert(row: Row, layout: str, *, system_prompt: str, input_field: str) -> Example | str:
    if layout == "messages":
        turns = row.get("messages")
        messages = [
            {"role": _text(m.get("role")), "content": _text(m.get("content"))}
            for m in (turns if isinstance(turns, list) else [])
            if isinstance(m, dict)
        ]
        if not messages or messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
            return "no_final_assistant_turn"
        if any(m["role"] not in ROLES for m in messages):
            # Tool or unnamed turns: the built-in templates would render them as plain text.
            return "unknown_role"
        if messages[0]["role"] != "system" and system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return Example(messages=messages)
    if layout == "text":
        text = _text(row.get(input_field))
        return Example(text=text) if text else "empty_text"
    if layout == "alpaca":
        instruction, user_input = _text(row.get("instruction")), _text(row.get("input"))
        answer = _text(row.get("output"))
        system, user = (instruction, user_input) if user_input else (system_prompt, instruction)
    else:
        system = _text(row.get("system")) or system_prompt
        user, answer = _first(row, QUESTION_KEYS), _first(row, ANSWER_KEYS)
    if not user:
        return "empty_question"
    if not answer:
        return "empty_answer"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return Example(messages=messages)
