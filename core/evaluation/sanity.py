"""How answers end: a tuned model that rambles or loops is worse whatever ROUGE says.

What counts as a loop, and the repeated n-gram rate, are core/repetition.py's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.repetition import loops, repeated_ngram_rate

__all__ = ["generation_stats", "loops", "repeated_ngram_rate"]


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
