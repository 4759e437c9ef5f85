"""Render conversations through the tokenizer's chat template and label the answers only.

Labels are -100 on prompt tokens, so the loss is on what the assistant says, including the
end-of-turn token that teaches the model to stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.data.conversations import Example, Message
from core.data.templates import CHATML

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


@dataclass
class EncodedSet:
    items: list[Encoded]
    stats: dict[str, Any] = field(default_factory=dict)


def ensure_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML  # used only when a tokenizer ships none


def render(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def answer_spans(tokenizer: Any, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of each assistant turn (end-of-turn included)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(render(tokenizer, messages[: i + 1]))
        spans.append((start, end))
    return render(tokenizer, messages), spans


def encode(
    tokenizer: Any, example: Example, *, max_length: int, train_on_prompt: bool = False
) -> Encoded:
    if example.text is not None:
        ids = tokenizer(example.text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = [*ids, tokenizer.eos_token_id]
        return Encoded(ids[:max_length], ids[:max_length], truncated=len(ids) > max_length)
    assert example.messages is not None
    text, spans = answer_spans(tokenizer, example.messages)
    # The template writes the special tokens itself; letting the tokenizer add them too doubles BOS.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [
        tok if train_on_prompt or any(s <= start < e for s, e in spans) else IGNORE_INDEX
        for tok, (start, _end) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return Encoded(ids[:max_length], labels[:max_length], truncated=len(ids) > max_length)


def encode_all(
    tokenizer: Any, examples: list[Example], *, max_length: int, train_on_prompt: bool = False
) -> EncodedSet:
    items = [
        encode(tokenizer, ex, max_length=max_length, train_on_prompt=train_on_prompt)
        for ex in examples
    ]
    lengths = sorted(len(i.input_ids) for i in items)
    trained = sum(sum(1 for t in i.labels if t != IGNORE_INDEX) for i in items)
    total = sum(lengths)
    stats = {
        "examples": len(items),
        "tokens": total,
        "trained_tokens": trained,
        "trained_token_share": round(trained / total, 4) if total else 0.0,
        "truncated": sum(i.truncated for i in items),
        "length_p50": lengths[len(lengths) // 2],
        "length_max": lengths[-1],
    }
    return EncodedSet(items=items, stats=stats)
