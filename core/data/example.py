"""A training example: what every importer produces and every later step reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# One chat turn: {"role": "system" | "user" | "assistant", "content": "..."}.
Message = dict[str, str]


@dataclass
class Example:
    """One training example: a conversation, or raw text when the row only had ready text.

    ``meta`` holds the row's index in the loaded dataset (``row``) and metadata columns.
    """

    messages: list[Message] | None = None
    text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # Raw text for continued pretraining (format "text"): a long one is split into windows of
    # max_seq_length tokens instead of being cut (core.data.text).
    raw: bool = False
