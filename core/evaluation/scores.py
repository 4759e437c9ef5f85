"""Scores of answers against reference answers, per question where the metric allows.

ROUGE-1/2/L (F1, ``rouge-score`` with stemming) and METEOR (NLTK, with WordNet from
core/evaluation/wordnet.py) per question; BLEU (``sacrebleu``) per corpus, from per-question
n-gram statistics so that a bootstrap can re-sum them for any resample of the questions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.evaluation.wordnet import ensure_wordnet
from core.settings import get_settings

PER_QUESTION = ("rouge1", "rouge2", "rougeL", "meteor")


def _meteor() -> Callable[..., float] | None:
    if not ensure_wordnet(_nltk_data()):
        return None
    from nltk.translate.meteor_score import meteor_score

    return meteor_score


def _nltk_data() -> Path:
    return get_settings().home / "nltk_data"


def meteor_available() -> bool:
    return _meteor() is not None


@dataclass
class Scored:
    """One model's answers scored: per-question values and BLEU's per-question statistics."""

    per_question: dict[str, list[float]] = field(default_factory=dict)
    bleu_stats: list[tuple[list[int], list[int], int, int]] = field(default_factory=list)

    def bleu(self, indices: Sequence[int] | None = None) -> float:
        """Corpus BLEU of the questions at ``indices`` (all by default)."""
        from sacrebleu.metrics.bleu import BLEU

        rows = self.bleu_stats if indices is None else [self.bleu_stats[i] for i in indices]
        if not rows:
            return 0.0
        correct = [sum(r[0][n] for r in rows) for n in range(4)]
        total = [sum(r[1][n] for r in rows) for n in range(4)]
        sys_len, ref_len = sum(r[2] for r in rows), sum(r[3] for r in rows)
        # "exp" smoothing: the default of sacrebleu.corpus_bleu, which these figures match.
        return BLEU.compute_bleu(correct, total, sys_len, ref_len, smooth_method="exp").score

    def means(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {
            name: round(sum(values) / len(values), 4) if values else None
            for name, values in self.per_question.items()
        }
        out["bleu"] = round(self.bleu(), 2) if self.bleu_stats else None
        return out


def score_answers(predictions: Sequence[str], references: Sequence[str]) -> Scored:
    from rouge_score import rouge_scorer
    from sacrebleu.metrics.bleu import BLEU

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pairs = list(zip(predictions, references, strict=True))
    rows = [scorer.score(ref, pred) for pred, ref in pairs]
    scored = Scored(
        per_question={n: [r[n].fmeasure for r in rows] for n in ("rouge1", "rouge2", "rougeL")}
    )
    meteor = _meteor()
    if meteor is not None:
        scored.per_question["meteor"] = [meteor([r.split()], p.split()) for p, r in pairs]
    bleu = BLEU()
    for pred, ref in pairs:
        stats = bleu._extract_corpus_statistics([pred], [[ref]])[0]
        # sacrebleu's row (its corpus_score sums these): sys_len, ref_len, the matches of
        # each n-gram order 1-4, then the totals; a test checks the sum equals corpus_bleu.
        row = [int(v) for v in stats]
        scored.bleu_stats.append((row[2:6], row[6:10], row[0], row[1]))
    return scored


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Mean ROUGE-1/2/L and METEOR, corpus BLEU; None where there is nothing to score."""
    means = score_answers(predictions, references).means()
    means.setdefault("meteor", None)
    return means
