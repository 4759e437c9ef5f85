"""How answers end: a tuned model that rambles or loops is worse whatever ROUGE says.

An answer loops when one phrase of ``LOOP_WORDS`` words comes ``LOOP_REPEATS`` or more times;
the repeated n-gram rate is the share of an answer's word 4-grams that repeat an earlier one.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

LOOP_WORDS = 8
LOOP_REPEATS = 3
REPEAT_N = 4
_WORD = re.compile(r"\w+")


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def loops(text: str) -> bool:
    counts = Counter(_ngrams(text, LOOP_WORDS))
    return bool(counts) and max(counts.values()) >= LOOP_REPEATS


def repeated_ngram_rate(text: str, n: int = REPEAT_N) -> float:
    grams = _ngrams(text, n)
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def generation_stats(answers: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Over answers with ``answer``, ``stopped`` and ``tokens``: stop rate, mean length in
    tokens, the share that loops and the mean repeated 4-gram rate."""
    n = len(answers)
    if not n:
        return {"stop_rate": None, "mean_tokens": None, "loop_rate": None, "repeated_4gram": None}
    return {
        "stop_rate": round(sum(bool(a["stopped"]) for a in answers) / n, 4),
        "mean_tokens": round(sum(a["tokens"] for a in answers) / n, 1),
        "loop_rate": round(sum(loops(a["answer"]) for a in answers) / n, 4),
        "repeated_4gram": round(sum(repeated_ngram_rate(a["answer"]) for a in answers) / n, 4),
    }
