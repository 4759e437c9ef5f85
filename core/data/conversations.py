"""Turn heterogeneous rows into chat conversations (a list of role/content messages)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

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
    # Where each example's system turn came from: "row", "job", or "none" (no system turn).
    system_from: Counter[str] = field(default_factory=Counter)


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


def to_examples(
    rows: list[Row],
    *,
    system_prompt: str,
    input_field: str,
    system_prompt_source: Literal["row", "job"] = "row",
) -> Conversion:
    """Map rows to conversations; rows with an empty question or answer are dropped and counted.

    ``system_prompt_source`` "row": a row's own system text wins where it has one (Alpaca:
    ``instruction`` when ``input`` is set, the recipe's medical layout; a ``system`` column; a
    messages list's system turn), and the job's ``system_prompt`` fills in elsewhere. "job": the
    job's prompt is every example's system turn; an Alpaca instruction then joins the user turn
    (instruction, blank line, input) and a row's own system text is not used.
    """
    layout = detect_layout(rows[0], input_field)
    conv = Conversion(examples=[], layout=layout)
    for index, row in enumerate(rows):
        example = _convert(
            row, layout, job=system_prompt, input_field=input_field, mode=system_prompt_source
        )
        if isinstance(example, str):
            conv.dropped[example] += 1
            continue
        example.meta = {"row": index, **{k: row[k] for k in META_KEYS if row.get(k)}}
        conv.examples.append(example)
        conv.system_from[_system_source(example, system_prompt)] += 1
    if not conv.examples:
        raise DatasetError(
            f"every row was dropped ({dict(conv.dropped)}); check the column names",
            field="training_dataset",
            code="dataset_empty",
        )
    return conv


def _system_source(example: Example, job: str) -> str:
    messages = example.messages or []
    if not messages or messages[0]["role"] != "system":
        return "none"
    # The job's own text counts as the job's even where a row repeats it word for word.
    return "job" if messages[0]["content"] == job else "row"


def _system(row_text: str, job: str, mode: str) -> str:
    return row_text if mode == "row" and row_text else job


def _convert(row: Row, layout: str, *, job: str, input_field: str, mode: str) -> Example | str:
    if layout == "messages":
        return _convert_messages(row, job=job, mode=mode)
    if layout == "text":
        text = _text(row.get(input_field))
        return Example(text=text) if text else "empty_text"
    if layout == "alpaca":
        instruction, user_input = _text(row.get("instruction")), _text(row.get("input"))
        answer = _text(row.get("output"))
        if mode == "job":
            system, user = job, "\n\n".join(t for t in (instruction, user_input) if t)
        elif user_input:
            # The recipe's medical sets: the instruction is the system text, input the question.
            system, user = instruction or job, user_input
        else:
            system, user = job, instruction
    else:
        system = _system(_text(row.get("system")), job, mode)
        user, answer = _first(row, QUESTION_KEYS), _first(row, ANSWER_KEYS)
    if not user:
        return "empty_question"
    if not answer:
        return "empty_answer"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return Example(messages=messages)


def _convert_messages(row: Row, *, job: str, mode: str) -> Example | str:
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
    own = messages[0]["content"] if messages[0]["role"] == "system" else ""
    if messages[0]["role"] == "system":
        messages = messages[1:]
    system = _system(own, job, mode)
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return Example(messages=messages)
