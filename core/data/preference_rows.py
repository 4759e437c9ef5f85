"""Preference rows: a prompt, the answer preferred and the one rejected, in the layouts in use.

- ``{"prompt": str | [messages], "chosen": ..., "rejected": ...}`` (TRL's explicit prompt);
  ``messages`` (a prompt conversation) or ``question`` may stand for ``prompt``.
- ``{"chosen": [messages], "rejected": [messages]}``: whole conversations sharing their prompt
  (TRL's implicit prompt).
- OpenAI's preference file, as is: ``{"input": {"messages": [...]}, "preferred_output":
  [{"role": "assistant", "content": ...}], "non_preferred_output": [...]}``.

An answer is text, an assistant message, or a list whose last message is the answer. No
tokenizer and no torch here: the API checks a file's layout at submit time.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from core.data.cleaning import clean_text
from core.data.conversations import ROLES
from core.data.example import Example, Message
from core.errors import DatasetError

PROMPT_KEYS = ("prompt", "messages", "question")
OPENAI_KEYS = ("input", "preferred_output", "non_preferred_output")
NOT_PREFERENCE = "dataset_not_preference"
Row = dict[str, Any]


@dataclass
class Pair:
    """One preference example: the prompt conversation (ending with a user turn) and the two
    answers to it."""

    prompt: list[Message]
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict)

    def as_example(self) -> Example:
        """The prompt and the chosen answer: what evaluation asks and scores against."""
        answer = {"role": "assistant", "content": self.chosen}
        return Example(messages=[*self.prompt, answer], meta=self.meta)

    def dedupe_key(self) -> Example:
        """An Example whose text is the whole pair, for core.data.cleaning's dedupe."""
        turns = [*self.prompt, {"role": "chosen", "content": self.chosen}]
        return Example(messages=[*turns, {"role": "rejected", "content": self.rejected}])


@dataclass
class Pairs:
    pairs: list[Pair]
    layout: str
    dropped: Counter[str] = field(default_factory=Counter)
    system_from: Counter[str] = field(default_factory=Counter)


def detect_layout(row: Row) -> str:
    """``openai`` or ``preference``; a row with neither is refused, naming what is needed."""
    if all(k in row for k in OPENAI_KEYS):
        return "openai"
    if "chosen" in row and "rejected" in row:
        return "preference"
    raise DatasetError(
        f"rows have columns {sorted(row)[:12]}, and a dpo or orpo job trains on preference "
        "pairs: give each row prompt (or messages), chosen and rejected, or OpenAI's "
        "input.messages, preferred_output and non_preferred_output (rename columns with "
        "training_dataset.rename_columns), or set training_config.method to 'sft' for "
        "question/answer data",
        field="training_dataset.name",
        code=NOT_PREFERENCE,
    )


def _parsed(value: Any) -> Any:
    # CSV cells hold message lists as JSON text.
    if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _content(value: Any) -> str:
    # OpenAI content may be a list of parts: [{"type": "text", "text": ...}].
    if isinstance(value, list):
        return clean_text(" ".join(str(p.get("text", "")) for p in value if isinstance(p, dict)))
    return clean_text(value)


def _messages(value: Any) -> list[Message] | None:
    value = _parsed(value)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        return None
    return [
        {"role": clean_text(m.get("role")), "content": _content(m.get("content"))} for m in value
    ]


def _answer(value: Any) -> str:
    """Text, an assistant message, or a list whose last message is the answer."""
    turns = _messages(value)
    if turns is None:
        return clean_text(value)
    return turns[-1]["content"] if turns and turns[-1]["role"] == "assistant" else ""


def _split_implicit(chosen: list[Message], rejected: list[Message]) -> list[Message]:
    """The turns two whole conversations share before their last (assistant) turn."""
    shared = []
    for a, b in zip(chosen[:-1], rejected[:-1], strict=False):
        if a != b:
            break
        shared.append(a)
    return shared


def _prompt(row: Row, layout: str) -> list[Message] | None:
    if layout == "openai":
        source = row.get("input")
        return _messages(source.get("messages") if isinstance(source, dict) else None)
    for key in PROMPT_KEYS:
        if key in row:
            turns = _messages(row[key])
            if turns is not None:
                return turns
            text = clean_text(row[key])
            return [{"role": "user", "content": text}] if text else []
    chosen, rejected = _messages(row.get("chosen")), _messages(row.get("rejected"))
    if chosen and rejected:
        return _split_implicit(chosen, rejected)
    return None


def _with_system(
    prompt: list[Message], *, job: str, mode: Literal["row", "job"]
) -> tuple[list[Message], str]:
    """The job's system prompt where the row has none (or always, with mode 'job')."""
    has_system = bool(prompt) and prompt[0]["role"] == "system"
    own = prompt[0]["content"] if has_system else ""
    system = own if mode == "row" and own else job
    # As for SFT examples: the job's own text counts as the job's where a row repeats it.
    source = "none" if not system else ("job" if system == job else "row")
    turns = prompt[1:] if has_system else prompt
    return ([{"role": "system", "content": system}] if system else []) + turns, source


def _pair(row: Row, layout: str, *, job: str, mode: Literal["row", "job"]) -> Pair | str:
    prompt = _prompt(row, layout)
    if layout == "openai":
        chosen, rejected = _answer(row["preferred_output"]), _answer(row["non_preferred_output"])
    else:
        chosen, rejected = _answer(row.get("chosen")), _answer(row.get("rejected"))
    if not prompt or not any(m["content"] for m in prompt if m["role"] == "user"):
        return "empty_prompt"
    if any(m["role"] not in ROLES for m in prompt):
        return "unknown_role"
    if prompt[-1]["role"] != "user":
        return "prompt_not_ending_with_user_turn"
    if not chosen:
        return "empty_chosen"
    if not rejected:
        return "empty_rejected"
    if chosen == rejected:
        return "chosen_equals_rejected"
    turns, source = _with_system(prompt, job=job, mode=mode)
    return Pair(prompt=turns, chosen=chosen, rejected=rejected, meta={"system_from": source})


def to_pairs(
    rows: list[Row], *, system_prompt: str, system_prompt_source: Literal["row", "job"] = "row"
) -> Pairs:
    """Map rows to preference pairs; rows that are not a usable pair are dropped and counted."""
    layout = detect_layout(rows[0])
    out = Pairs(pairs=[], layout=layout)
    for index, row in enumerate(rows):
        pair = _pair(row, layout, job=system_prompt, mode=system_prompt_source)
        if isinstance(pair, str):
            out.dropped[pair] += 1
            continue
        out.system_from[pair.meta.pop("system_from")] += 1
        pair.meta["row"] = index
        out.pairs.append(pair)
    if not out.pairs:
        raise DatasetError(
            f"no row is a usable preference pair ({dict(out.dropped)}); each needs a prompt "
            "ending with a user turn, and a chosen and a rejected answer that differ",
            field="training_dataset",
            code="dataset_empty",
        )
    return out


def check_rows(spec: Any, path: Any, *, validation: bool = False) -> None:
    """At submit: a dpo or orpo job's local file (not a folder or a Hub dataset) starts with a
    preference pair, after the spec's rename and remove steps; else 422 dataset_not_preference
    now rather than a failed job later. ``validation``: the file is the validation_dataset's."""
    from core.data.sources import _read_path, map_columns
    from core.data.validation import scoped, validation_section

    if spec.training.method == "sft" or path is None or path.is_dir():
        return
    section = spec.dataset
    if validation:
        section = validation_section(spec.dataset, spec.validation_dataset)
    first = next((row for row in _read_path(path) if isinstance(row, dict)), None)
    if first is None:
        return  # the worker names what is wrong with a file that has no readable row
    with scoped() if validation else contextlib.nullcontext():
        detect_layout(map_columns([first], section)[0])
