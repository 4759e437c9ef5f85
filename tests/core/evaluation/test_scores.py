"""Scores: BLEU re-summed per question equals sacrebleu's corpus BLEU; METEOR offline,
against hand-worked values (NLTK's defaults: alpha 0.9, beta 3, gamma 0.5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sacrebleu

from core.evaluation.scores import score_answers
from core.evaluation.wordnet import DEBIAN_WORDNET, ensure_wordnet, install_from, lexnames_text

PREDS = ["the cat sat on the mat", "a dog ran far away from home", "high blood pressure"]
REFS = ["the cat is on the mat", "the dog ran away from its home", "high blood pressure hurts"]


def test_bleu_from_per_question_statistics_is_corpus_bleu() -> None:
    scored = score_answers(PREDS, REFS)
    assert scored.bleu() == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score)
    # A bootstrap resample repeats questions: the re-summed figure still matches.
    idx = [0, 0, 2]
    resampled = sacrebleu.corpus_bleu([PREDS[i] for i in idx], [[REFS[i] for i in idx]]).score
    assert scored.bleu(idx) == pytest.approx(resampled)


def test_rouge_is_per_question() -> None:
    scored = score_answers(PREDS, PREDS)
    assert scored.per_question["rougeL"] == [1.0, 1.0, 1.0]
    assert score_answers([], []).means()["rougeL"] is None


@pytest.fixture(scope="module")
def meteor(tmp_path_factory: pytest.TempPathFactory):
    # `make test` installs Debian's wordnet-base and wordnet-sense-index (`make wordnet`).
    assert ensure_wordnet(tmp_path_factory.mktemp("nltk_data")), (
        f"no WordNet: install Debian's wordnet-base and wordnet-sense-index ({DEBIAN_WORDNET})"
    )
    from nltk.translate.meteor_score import meteor_score

    return meteor_score


@pytest.mark.parametrize(
    ("reference", "hypothesis", "expected"),
    [
        # 2 exact matches, P 2/3, R 2/5: Fmean = PR / (0.9 P + 0.1 R) = 0.41667; one chunk of
        # two matches: penalty 0.5 (1/2)^3 = 0.0625; 0.41667 x 0.9375 = 0.390625.
        ("high blood pressure damages arteries", "blood pressure rises", 0.390625),
        # 'damaged' ~ 'damage' by stem: P 1, R 2/3, Fmean 0.68966; two chunks of two matches:
        # penalty 0.5, so 0.34483.
        ("damage to arteries", "arteries damaged", 0.344828),
        # WordNet synonyms (doctor.n.01 has 'physician'): Fmean 1, penalty 0.5.
        ("doctor", "physician", 0.5),
    ],
)
def test_meteor_matches_hand_worked_values(meteor, reference, hypothesis, expected) -> None:
    assert meteor([reference.split()], hypothesis.split()) == pytest.approx(expected, abs=1e-5)


def test_meteor_is_part_of_the_scores(meteor) -> None:
    scored = score_answers(["physician"], ["doctor"])
    assert scored.per_question["meteor"] == [pytest.approx(0.5)]


def test_wordnet_install_writes_lexnames_and_refuses_a_missing_source(tmp_path: Path) -> None:
    lines = lexnames_text().splitlines()
    assert len(lines) == 45
    assert lines[0] == "00\tadj.all\t3" and lines[3] == "03\tnoun.Tops\t1"
    assert lines[44] == "44\tadj.ppl\t3"
    assert install_from(tmp_path / "nowhere", tmp_path / "nltk") is None
    assert not (tmp_path / "nltk").exists()
