"""Text cleaning, duplicate removal and the validation split.

MedQuAD answers carry HTML entities (sometimes escaped twice), non-breaking spaces and runs of
indentation between paragraphs; scraped CSVs add NaN cells. Everything a model reads passes
through ``clean_text`` once, when rows become conversations.
"""

from __future__ import annotations

import hashlib
import html
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from core.repetition import loops

if TYPE_CHECKING:  # conversations imports clean_text from here
    from core.data.example import Example

_SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_SPACE_AROUND_NEWLINE = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")
_NOT_WORD = re.compile(r"[\W_]+")


def clean_text(value: Any) -> str:
    """Unescape HTML entities, normalise whitespace, strip; None and NaN become ''."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = value if isinstance(value, str) else str(value)
    if "&" in text:
        # Twice: scraped medical text is often escaped twice ("&amp;apos;").
        text = html.unescape(html.unescape(text))
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES.sub(" ", text)
    if "\n" in text:
        text = _BLANK_LINES.sub("\n\n", _SPACE_AROUND_NEWLINE.sub("\n", text))
    text = text.strip()
    return "" if text.lower() == "nan" else text  # a NaN cell written out as text


def normalized_key(text: str) -> str:
    """Case, accents, punctuation and whitespace folded away: near-identical texts collide."""
    folded = unicodedata.normalize("NFKD", text.casefold())
    if not folded.isascii():
        folded = "".join(c for c in folded if not unicodedata.combining(c))
    return _NOT_WORD.sub(" ", folded).strip()


def _conversation_text(example: Example) -> str:
    if example.messages is None:
        return example.text or ""
    # The system prompt is the same for most rows; duplicates are about what is asked and said.
    return "\x1f".join(
        f"{m['role']}\x1e{m['content']}" for m in example.messages if m["role"] != "system"
    )


@dataclass
class Seen:
    """Conversations already kept: shared across the sources of a mix, so that a question in
    two sources is trained once (and counted as a duplicate of the later source)."""

    exact: set[str] = field(default_factory=set)
    normalized: set[str] = field(default_factory=set)


def dedupe(
    examples: list[Example],
    mode: Literal["none", "exact", "normalized"],
    *,
    seen: Seen | None = None,
) -> tuple[list[Example], Counter[str]]:
    """Keep the first of each duplicate; count the rest as exact or normalised duplicates."""
    dropped: Counter[str] = Counter()
    if mode == "none":
        return examples, dropped
    seen = seen or Seen()
    seen_exact, seen_norm = seen.exact, seen.normalized
    kept = []
    for example in examples:
        text = _conversation_text(example)
        if text in seen_exact:
            dropped["duplicate_exact"] += 1
            continue
        seen_exact.add(text)
        if mode == "normalized":
            key = normalized_key(text)
            if key in seen_norm:
                dropped["duplicate_normalized"] += 1
                continue
            seen_norm.add(key)
        kept.append(example)
    return kept, dropped


def drop_looping(examples: list[Example]) -> tuple[list[Example], Counter[str]]:
    """Drop conversations with an answer that loops (core/repetition.py), counted as
    ``answer_loops``: a model trained on scraped answers that repeat one phrase learns to repeat
    it (34 of the recipe's 2,000 rows do). Raw-text documents are kept as they are."""
    kept = [
        e
        for e in examples
        if e.messages is None
        or not any(m["role"] == "assistant" and loops(m["content"]) for m in e.messages)
    ]
    dropped: Counter[str] = Counter()
    if len(kept) < len(examples):
        dropped["answer_loops"] = len(examples) - len(kept)
    return kept, dropped


def validation_split(
    examples: list[Example], *, share: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out round(share * n) examples, chosen by a seeded hash of each conversation.

    The choice depends on the seed and the example's own text, not on row order, so the same
    question lands on the same side when the file is shuffled or grows.
    """
    count = round(share * len(examples))
    if count == 0:
        return examples, []
    salt = str(seed).encode()

    def rank(index: int) -> bytes:
        text = _conversation_text(examples[index]).encode()
        return hashlib.blake2b(text, key=salt[:64], digest_size=8).digest()

    held = set(sorted(range(len(examples)), key=rank)[:count])
    train = [e for i, e in enumerate(examples) if i not in held]
    validation = [e for i, e in enumerate(examples) if i in held]
    return train, validation
