"""``medtune jobs evaluation``: the stored result as tables, each score with its interval."""

from __future__ import annotations

from cli.evaluation import evaluation_text
from core.evaluation.run import compare
from core.evaluation.sanity import generation_stats

REFS = [f"answer number {i} says rest and drink water" for i in range(20)]


def test_tables_show_scores_intervals_and_verdicts() -> None:
    base = [f"unrelated text {i}" for i in range(20)]
    tuned = [f"answer number {i} says rest and drink water" for i in range(20)]
    result = {
        "examples": 20,
        "held_out_examples": 25,
        "decoding": {"greedy": True, "max_new_tokens": 64},
        **compare(base, tuned, REFS, seed=0),
        "generation": {
            "base": generation_stats([{"answer": b, "stopped": False, "tokens": 9} for b in base]),
            "tuned": generation_stats([{"answer": t, "stopped": True, "tokens": 8} for t in tuned]),
        },
        "benchmarks": [
            {
                "name": "mcq",
                "questions": 20,
                "base_accuracy": 0.4,
                "tuned_accuracy": 0.45,
                "difference": {
                    "difference": 0.05,
                    "low": -0.1,
                    "high": 0.2,
                    "confidence": 0.95,
                    "verdict": "no measurable difference",
                },
            }
        ],
        "meteor_note": None,
    }
    text = evaluation_text(result)
    assert text.startswith("20 held-out questions (of 25)")
    rouge = next(line for line in text.splitlines() if line.startswith("rougeL"))
    assert rouge.split()[-1] == "better" and ".." in rouge
    stop = next(line for line in text.splitlines() if line.startswith("stop_rate"))
    assert stop.split()[1:] == ["0.0", "1.0"]
    mcq = next(line for line in text.splitlines() if line.startswith("mcq"))
    assert "-0.1 .. +0.2" in mcq and mcq.endswith("no measurable difference")
