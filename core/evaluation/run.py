"""Does the tuning help? Base model vs tuned adapter on held-out questions, scored by overlap.

ROUGE-1/2/L (F1, `rouge-score` with stemming) and corpus BLEU (`sacrebleu`) against the
reference answers; METEOR only where NLTK's WordNet data is installed (it is not downloaded:
the result says when it is missing). Greedy decoding, so a fixed seed reproduces the numbers.
"""

from __future__ import annotations

import statistics
from typing import Any

from core.data.example import Example

EVALUATION_FILE = "evaluation.json"  # in the job's artifacts folder


def _meteor() -> Any | None:
    try:
        from nltk.corpus import wordnet
        from nltk.translate.meteor_score import meteor_score

        wordnet.synsets("test")  # raises LookupError when the data is not installed
    except (ImportError, LookupError):
        return None
    return meteor_score


def score(predictions: list[str], references: list[str]) -> dict[str, float | None]:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rows = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    result: dict[str, float | None] = {
        name: round(statistics.fmean(r[name].fmeasure for r in rows), 4)
        for name in ("rouge1", "rouge2", "rougeL")
    }
    result["bleu"] = round(sacrebleu.corpus_bleu(predictions, [references]).score, 2)
    meteor = _meteor()
    result["meteor"] = (
        round(
            statistics.fmean(
                meteor([r.split()], p.split()) for p, r in zip(predictions, references, strict=True)
            ),
            4,
        )
        if meteor
        else None
    )
    return result


def generate(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    max_new_tokens: int,
    adapter: bool,
) -> str:
    return generate_with_stop(
        model, tokenizer, messages, max_new_tokens=max_new_tokens, adapter=adapter
    )["answer"]


def generate_with_stop(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    max_new_tokens: int,
    adapter: bool = True,
) -> dict[str, Any]:
    """Greedy answer, and whether it ended on the end-of-turn token (a tuned model should)."""
    from core.inference.generate import GenerationRequest, generate_one, is_peft

    # adapter=False asks the base model; only a PeftModel can switch its adapter off.
    name = model.active_adapter if adapter and is_peft(model) else None
    out = generate_one(
        model,
        tokenizer,
        GenerationRequest(messages=messages, max_new_tokens=max_new_tokens, adapter=name),
    )
    return {
        "question": messages[-1]["content"],
        "answer": out.text,
        "stopped": out.stopped_on_eos,
        "tokens": out.completion_tokens,
    }


def evaluate(
    model: Any, tokenizer: Any, examples: list[Example], *, max_examples: int, max_new_tokens: int
) -> dict[str, Any]:
    """Answers side by side and the scores of each model; ``model`` is the trained PeftModel."""
    chosen = [e for e in examples if e.messages][:max_examples]
    model.eval()
    answers = []
    for example in chosen:
        assert example.messages is not None
        prompt, reference = example.messages[:-1], example.messages[-1]["content"]
        answers.append(
            {
                "question": prompt[-1]["content"],
                "reference": reference,
                "base": generate(
                    model, tokenizer, prompt, max_new_tokens=max_new_tokens, adapter=False
                ),
                "tuned": generate(
                    model, tokenizer, prompt, max_new_tokens=max_new_tokens, adapter=True
                ),
            }
        )
    references = [a["reference"] for a in answers]
    return {
        "examples": len(answers),
        "decoding": {"greedy": True, "max_new_tokens": max_new_tokens},
        "base": score([a["base"] for a in answers], references),
        "tuned": score([a["tuned"] for a in answers], references),
        "meteor_note": None if _meteor() else "METEOR skipped: NLTK WordNet data not installed",
        "answers": answers,
    }
