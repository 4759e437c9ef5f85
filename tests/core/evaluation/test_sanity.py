"""How answers end: loops, repeated n-grams, stop rate and length."""

from __future__ import annotations

import pytest

from core.evaluation.sanity import generation_stats, loops, repeated_ngram_rate

PHRASE = "drink plenty of water and rest for a few days"


def test_an_eight_word_phrase_three_times_loops() -> None:
    assert loops(" ".join([PHRASE] * 3))
    assert not loops(" ".join([PHRASE] * 2))
    assert not loops("Anemia is a lack of healthy red blood cells.")
    assert not loops("")


def test_repeated_ngram_rate() -> None:
    assert repeated_ngram_rate("a b c d e f") == 0.0
    assert repeated_ngram_rate("a b c d a b c d") == pytest.approx(1 - 4 / 5)
    assert repeated_ngram_rate("too short") == 0.0


def test_generation_stats() -> None:
    answers = [
        {"answer": " ".join([PHRASE] * 3), "stopped": False, "tokens": 40},
        {"answer": "Rest.", "stopped": True, "tokens": 3},
    ]
    stats = generation_stats(answers)
    assert stats["stop_rate"] == 0.5 and stats["loop_rate"] == 0.5
    assert stats["mean_tokens"] == 21.5 and 0 < stats["repeated_4gram"] < 1
    assert generation_stats([])["stop_rate"] is None
