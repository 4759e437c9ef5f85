"""Does the tuning help? Base model vs tuned adapter on held-out questions.

run.py answers the questions and assembles the result; scores.py scores answers against the
references (ROUGE, BLEU, METEOR); intervals.py turns paired scores into a bootstrap interval
and a verdict; sanity.py measures how answers end (stop, length, loops); choice.py scores
multiple-choice benchmarks; wordnet.py finds the WordNet data METEOR needs, offline.
"""

from core.evaluation.run import EVALUATION_FILE, evaluate
from core.evaluation.scores import score

__all__ = ["EVALUATION_FILE", "evaluate", "score"]
