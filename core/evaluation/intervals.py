"""Is a difference real? A paired bootstrap over questions (Koehn 2004; Efron's percentile
interval): resample the questions with replacement, recompute base and tuned on the same
resample, and read the 2.5th and 97.5th percentiles of tuned minus base."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

RESAMPLES = 1000
CONFIDENCE = 0.95

Statistic = Callable[[Sequence[int]], float]


def verdict(low: float, high: float) -> str:
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no measurable difference"


def mean_of(values: Sequence[float]) -> Statistic:
    return lambda idx: sum(values[i] for i in idx) / len(idx)


def paired_bootstrap(
    n: int,
    base: Statistic,
    tuned: Statistic,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    digits: int = 4,
) -> dict[str, Any] | None:
    """The difference tuned - base over all ``n`` questions, its interval and the verdict.

    ``base`` and ``tuned`` compute a statistic from a list of question indices (a mean, or a
    corpus BLEU re-summed from per-question counts). None when there are no questions.
    """
    if n == 0:
        return None
    everything = range(n)
    rng = random.Random(seed)
    diffs = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in everything]
        diffs.append(tuned(idx) - base(idx))
    diffs.sort()
    tail = (1 - confidence) / 2
    low = diffs[int(tail * resamples)]
    high = diffs[min(resamples - 1, int((1 - tail) * resamples))]
    return {
        "difference": round(tuned(everything) - base(everything), digits),
        "low": round(low, digits),
        "high": round(high, digits),
        "confidence": confidence,
        "verdict": verdict(low, high),
    }
