"""Render conversations through the tokenizer's chat template and label the answers only.

Labels are -100 on prompt tokens, so the loss is on what the assistant says, including the
end-of-turn token that teaches the model to stop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.data.example import Example, Message
from core.data.templates import CHATML, TEMPLATES

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """Token ids and labels (cut to max_length), and what the gate needs from before the cut."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    length: int = 0  # tokens before truncation
    answer_spans: list[tuple[int, int]] = field(default_factory=list)  # token spans, uncut
    full_ids: list[int] = field(default_factory=list, repr=False)  # the uncut ids
    full_labels: list[int] = field(default_factory=list, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class EncodedSet:
    items: list[Encoded]
    stats: dict[str, Any] = field(default_factory=dict)


def ensure_chat_template(tokenizer: Any, choice: str = "auto") -> str:
    """Set the template a job renders with and return its name.

    ``auto`` keeps the tokenizer's own template (ChatML when it ships none); any other choice
    replaces it with the built-in one, so training and inference render alike.
    """
    if choice != "auto":
        tokenizer.chat_template = TEMPLATES[choice]
        return choice
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML  # used only when a tokenizer ships none
        return "chatml"
    return "tokenizer"


def saved_chat_template(folder: Path) -> str | None:
    """The chat template a saved tokenizer folder carries (None if none), without loading it."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = folder / "tokenizer_config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("chat_template")
        if isinstance(value, str):
            return value
    return None


def render(
    tokenizer: Any,
    messages: list[Message],
    *,
    add_generation_prompt: bool = False,
    chat_template: str | None = None,
) -> str:
    """The chat as text, by the tokenizer's template or by ``chat_template`` when given."""
    return tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        chat_template=chat_template,
    )


def answer_spans(tokenizer: Any, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of each assistant turn (end-of-turn included)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        full = render(tokenizer, messages[: i + 1])
        spans.append((start, _end_of_turn_end(tokenizer, full, start)))
    return render(tokenizer, messages), spans


def _special_strings(tokenizer: Any) -> list[str]:
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            special.add(str(tok.content if hasattr(tok, "content") else tok))
    return [s for s in special if s]


def _end_of_turn_end(tokenizer: Any, text: str, start: int) -> int:
    """Where the assistant turn that starts at ``start`` ends: just after its end-of-turn
    token. What a template writes after it (ChatML's and Gemma's "\\n") belongs to the next
    turn's framing, not to the answer: trained, it is a token generation never reaches."""
    end = len(text)
    best = -1
    for token in _special_strings(tokenizer):
        at = text.rfind(token, start, end)
        if at >= 0 and at + len(token) > best:
            best = at + len(token)
    if best < 0:  # no special token closes the turn (a template without one): keep it whole
        return end
    return best


def encode(
    tokenizer: Any, example: Example, *, max_length: int, train_on_prompt: bool = False
) -> Encoded:
    return _encode_batch(
        tokenizer, [example], max_length=max_length, train_on_prompt=train_on_prompt
    )[0]


def _encode_batch(
    tokenizer: Any, examples: list[Example], *, max_length: int, train_on_prompt: bool
) -> list[Encoded]:
    chats = [(i, e) for i, e in enumerate(examples) if e.messages is not None]
    texts = [(i, e) for i, e in enumerate(examples) if e.messages is None]
    out: list[Encoded | None] = [None] * len(examples)
    if chats:
        rendered = [answer_spans(tokenizer, e.messages or []) for _, e in chats]
        # The template writes the special tokens itself; letting the tokenizer add them too
        # doubles BOS. One batched call lets the Rust tokenizer use every core.
        enc = tokenizer(
            [text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True
        )
        for (index, example), (_, spans), ids, offsets in zip(
            chats, rendered, enc["input_ids"], enc["offset_mapping"], strict=True
        ):
            out[index] = _label(ids, offsets, spans, example, max_length, train_on_prompt)
    if texts:
        enc = tokenizer([e.text or "" for _, e in texts], add_special_tokens=True)
        for (index, example), ids in zip(texts, enc["input_ids"], strict=True):
            if tokenizer.eos_token_id is not None and (
                not ids or ids[-1] != tokenizer.eos_token_id
            ):
                ids = [*ids, tokenizer.eos_token_id]
            out[index] = Encoded(
                ids[:max_length],
                ids[:max_length],
                truncated=len(ids) > max_length,
                length=len(ids),
                answer_spans=[(0, len(ids))],
                full_ids=ids,
                full_labels=ids,
                meta=example.meta,
            )
    return [e for e in out if e is not None]


def _label(
    ids: list[int],
    offsets: list[tuple[int, int]],
    spans: list[tuple[int, int]],
    example: Example,
    max_length: int,
    train_on_prompt: bool,
) -> Encoded:
    labels = [IGNORE_INDEX] * len(ids)
    token_spans = []
    cursor = 0
    for start, end in spans:  # spans are in order; walk the tokens once
        while cursor < len(ids) and offsets[cursor][0] < start:
            cursor += 1
        first = cursor
        while cursor < len(ids) and offsets[cursor][0] < end:
            labels[cursor] = ids[cursor]
            cursor += 1
        token_spans.append((first, cursor))
    if train_on_prompt:
        labels = list(ids)
    return Encoded(
        ids[:max_length],
        labels[:max_length],
        truncated=len(ids) > max_length,
        length=len(ids),
        answer_spans=token_spans,
        full_ids=ids,
        full_labels=labels,
        meta=example.meta,
    )


def encode_all(
    tokenizer: Any,
    examples: list[Example],
    *,
    max_length: int,
    train_on_prompt: bool = False,
    batch_size: int = 1024,
) -> EncodedSet:
    items: list[Encoded] = []
    for start in range(0, len(examples), batch_size):
        items += _encode_batch(
            tokenizer,
            examples[start : start + batch_size],
            max_length=max_length,
            train_on_prompt=train_on_prompt,
        )
    lengths = sorted(len(i.input_ids) for i in items)
    trained = sum(sum(1 for t in i.labels if t != IGNORE_INDEX) for i in items)
    total = sum(lengths)
    stats = {
        "examples": len(items),
        "tokens": total,
        "trained_tokens": trained,
        "trained_token_share": round(trained / total, 4) if total else 0.0,
        "truncated": sum(i.truncated for i in items),
        "length_p50": lengths[len(lengths) // 2] if lengths else 0,
        "length_max": lengths[-1] if lengths else 0,
    }
    return EncodedSet(items=items, stats=stats)
