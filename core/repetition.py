"""Text that loops: one phrase said again and again.

Shared by the evaluation (how often a model's answers loop) and the dataset stage (training
answers that loop teach a model to loop, so they are dropped by default). A text loops when one
phrase of ``LOOP_WORDS`` words comes ``LOOP_REPEATS`` or more times; the repeated n-gram rate is
the share of a text's word 4-grams that repeat an earlier one.
"""

from __future__ import annotations

import re
from collections import Counter

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
