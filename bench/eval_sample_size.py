"""How many held-out questions does an evaluation need to decide? (issue #18, max_examples)

Reads the evaluation.json of finished jobs (bench/eval_medquad.py or bench/eval_again.py runs),
scores each question again with the service's own scorer, and reports per metric the standard
deviation of the per-question tuned-minus-base difference and the number of questions at which
the 95% interval of the mean difference (about 1.96 sd / sqrt(n), what the paired bootstrap
gives for a mean) is narrower than a given effect:

    python bench/eval_sample_size.py /tmp/medtune-eval-*/jobs/*/evaluation.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from core.evaluation.scores import score_answers

EFFECTS = (0.01, 0.02, 0.03)  # ROUGE / METEOR points a user would care about


def sizes(path: Path) -> dict[str, object]:
    answers = json.loads(path.read_text())["answers"]
    references = [a["reference"] for a in answers]
    base = score_answers([a["base"] for a in answers], references).per_question
    tuned = score_answers([a["tuned"] for a in answers], references).per_question
    out: dict[str, object] = {"file": str(path), "questions": len(answers)}
    for metric in base:
        diffs = [t - b for t, b in zip(tuned[metric], base[metric], strict=True)]
        sd = statistics.stdev(diffs)
        out[metric] = {
            "mean_difference": round(statistics.fmean(diffs), 4),
            "sd_difference": round(sd, 4),
            **{f"n_for_{e}": math.ceil((1.96 * sd / e) ** 2) for e in EFFECTS},
            "n_to_decide_observed": math.ceil((1.96 * sd / abs(statistics.fmean(diffs))) ** 2)
            if statistics.fmean(diffs)
            else None,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    for path in args.files:
        print(json.dumps(sizes(path)))


if __name__ == "__main__":
    main()
