"""The paired bootstrap: direction, width and verdict."""

from __future__ import annotations

import random

from core.evaluation.intervals import mean_of, paired_bootstrap, verdict


def test_a_clear_gain_is_better_and_a_clear_loss_worse() -> None:
    rng = random.Random(1)
    base = [rng.random() * 0.3 for _ in range(60)]
    tuned = [b + 0.2 + rng.random() * 0.05 for b in base]
    up = paired_bootstrap(60, mean_of(base), mean_of(tuned))
    assert up is not None and up["verdict"] == "better"
    assert 0 < up["low"] <= up["difference"] <= up["high"]
    down = paired_bootstrap(60, mean_of(tuned), mean_of(base))
    assert down is not None and down["verdict"] == "worse" and down["high"] < 0


def test_noise_is_no_measurable_difference() -> None:
    rng = random.Random(2)
    base = [rng.random() for _ in range(40)]
    tuned = [rng.random() for _ in range(40)]
    result = paired_bootstrap(40, mean_of(base), mean_of(tuned))
    assert result is not None and result["low"] < 0 < result["high"]
    assert result["verdict"] == "no measurable difference"
    same = paired_bootstrap(40, mean_of(base), mean_of(base))
    assert same == {
        "difference": 0.0,
        "low": 0.0,
        "high": 0.0,
        "confidence": 0.95,
        "verdict": "no measurable difference",
    }


def test_pairing_narrows_the_interval() -> None:
    # Large per-question spread shared by both models: pairing cancels it.
    rng = random.Random(3)
    base = [rng.random() for _ in range(50)]
    tuned = [b + 0.01 for b in base]
    result = paired_bootstrap(50, mean_of(base), mean_of(tuned))
    assert result is not None and result["verdict"] == "better"
    assert result["high"] - result["low"] < 0.001


def test_seeded_and_empty() -> None:
    values = [0.1, 0.5, 0.3]
    a = paired_bootstrap(3, mean_of(values), mean_of([0.2, 0.1, 0.9]), seed=5)
    assert a == paired_bootstrap(3, mean_of(values), mean_of([0.2, 0.1, 0.9]), seed=5)
    assert paired_bootstrap(0, mean_of([]), mean_of([])) is None
    assert verdict(0.01, 0.2) == "better" and verdict(-0.2, -0.01) == "worse"
