"""The job's evaluation note: the ROUGE-L verdict, and a warning when the tuned answers end
worse than the base's (they loop more, or stop on their own less often)."""

from __future__ import annotations

from typing import Any

from core.evaluation.job import note


def result(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, Any]:
    return {
        "examples": 300,
        "base": {"rougeL": 0.151},
        "tuned": {"rougeL": 0.159},
        "difference": {
            "rougeL": {"verdict": "better", "difference": 0.0079, "low": 0.0018, "high": 0.0143}
        },
        "generation": {"base": base, "tuned": tuned},
    }


VERDICT = (
    "evaluated on 300 held-out examples: ROUGE-L base 0.1510, tuned 0.1590 "
    "(better: +0.0079, 95% CI +0.0018 to +0.0143)"
)


def test_answers_that_end_as_well_as_the_base_get_the_verdict_alone() -> None:
    same = {"loop_rate": 0.0033, "stop_rate": 0.11}
    better = {"loop_rate": 0.0, "stop_rate": 0.55}
    assert note(result(same, same)) == VERDICT
    assert note(result(same, better)) == VERDICT


def test_more_loops_and_fewer_stops_are_named_with_both_rates() -> None:
    text = note(
        result({"loop_rate": 0.003, "stop_rate": 0.47}, {"loop_rate": 0.033, "stop_rate": 0.4})
    )
    assert text.startswith(VERDICT + "; tuned answers ")
    assert "loop more often than the base's (3.3% vs 0.3%)" in text
    assert "stop on their own less often (40.0% vs 47.0%)" in text
    assert text.endswith("fewer steps or a lower learning_rate may help")


def test_only_loops_are_named_when_only_loops_are_worse() -> None:
    text = note(result({"loop_rate": 0.0, "stop_rate": 0.1}, {"loop_rate": 0.01, "stop_rate": 0.5}))
    assert "loop more often" in text and "stop on their own" not in text


def test_rates_that_were_not_measured_are_not_compared() -> None:
    unknown = {"loop_rate": None, "stop_rate": None}
    assert note(result(unknown, {"loop_rate": 0.5, "stop_rate": 0.0})) == VERDICT
