"""The evaluation a job runs after training: held-out questions asked of the base model and the
tuned adapter (the same in-memory model, adapter off and on, so both are on one backend), their
answers scored, each difference with a paired bootstrap interval and a verdict, how the answers
end, and any multiple-choice benchmarks. Greedy decoding, seeded sampling: a rerun reproduces it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import core.evaluation.choice as choice
from core.data.cleaning import normalized_key
from core.data.example import Example
from core.evaluation.intervals import mean_of, paired_bootstrap
from core.evaluation.sanity import generation_stats
from core.evaluation.scores import meteor_available, score_answers

EVALUATION_FILE = "evaluation.json"  # in the job's artifacts folder


def answer_questions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    adapter: bool = True,
    repetition_penalty: float = 1.0,
    batch_size: int = 1,
) -> list[dict[str, Any]]:
    """Greedy answers to ``prompts``, in their order, ``batch_size`` at a time (one padded
    generate call each, prompts of similar length together), each with whether it ended on
    the end-of-turn token (a tuned model should) and its tokens."""
    from core.inference.generate import GenerationRequest, generate_batch, is_peft

    # adapter=False asks the base model; only a PeftModel can switch its adapter off.
    name = model.active_adapter if adapter and is_peft(model) else None
    requests = [
        GenerationRequest(
            messages=messages,
            max_new_tokens=max_new_tokens,
            adapter=name,
            repetition_penalty=repetition_penalty,
        )
        for messages in prompts
    ]
    # Similar lengths share a batch: less padding to run through the model.
    order = sorted(range(len(prompts)), key=lambda i: sum(len(m["content"]) for m in prompts[i]))
    answers: dict[int, dict[str, Any]] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        outs = _fitting(generate_batch, model, tokenizer, [requests[i] for i in rows])
        for i, out in zip(rows, outs, strict=True):
            answers[i] = {
                "question": prompts[i][-1]["content"],
                "answer": out.text,
                "stopped": out.stopped_on_eos,
                "tokens": out.completion_tokens,
            }
    return [answers[i] for i in range(len(prompts))]


def _fitting(generate_batch: Any, model: Any, tokenizer: Any, requests: list[Any]) -> list[Any]:
    """``generate_batch``'s answers; a batch whose KV cache does not fit the card is answered in
    halves (the job trained for minutes: its evaluation must not fail it for a batch size)."""
    import torch

    try:
        return list(generate_batch(model, tokenizer, requests))
    except torch.cuda.OutOfMemoryError:
        if len(requests) == 1:
            raise
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = len(requests) // 2
    return _fitting(generate_batch, model, tokenizer, requests[:half]) + _fitting(
        generate_batch, model, tokenizer, requests[half:]
    )


def sample_questions(examples: Sequence[Example], limit: int, *, seed: int) -> list[Example]:
    """Up to ``limit`` examples with distinct questions, drawn in a seeded random order from the
    whole set (not its first rows: a file in document order holds a few documents' questions)."""
    answerable = [
        e
        for e in examples
        if e.messages and len(e.messages) >= 2 and e.messages[-1]["role"] == "assistant"
    ]
    order = list(range(len(answerable)))
    random.Random(seed).shuffle(order)
    seen: set[str] = set()
    chosen = []
    for i in order:
        example = answerable[i]
        assert example.messages is not None
        key = normalized_key(example.messages[-2]["content"])
        if key in seen:
            continue
        seen.add(key)
        chosen.append(example)
        if len(chosen) == limit:
            break
    return chosen


def compare(base: list[str], tuned: list[str], references: list[str], *, seed: int) -> dict:
    """Both models' mean scores and, per metric, the paired interval of tuned - base."""
    scored_base = score_answers(base, references)
    scored_tuned = score_answers(tuned, references)
    n = len(references)
    difference: dict[str, Any] = {
        name: paired_bootstrap(
            n, mean_of(scored_base.per_question[name]), mean_of(values), seed=seed
        )
        for name, values in scored_tuned.per_question.items()
    }
    difference["bleu"] = paired_bootstrap(
        n, scored_base.bleu, scored_tuned.bleu, seed=seed, digits=2
    )
    return {"base": scored_base.means(), "tuned": scored_tuned.means(), "difference": difference}


def run_benchmark(
    model: Any, tokenizer: Any, bench: choice.Benchmark, *, system_prompt: str | None, seed: int
) -> dict[str, Any]:
    base = choice.correct(model, tokenizer, bench, adapter=False, system_prompt=system_prompt)
    tuned = choice.correct(model, tokenizer, bench, adapter=True, system_prompt=system_prompt)
    n = len(bench.questions)
    return {
        "name": bench.name,
        "questions": n,
        "dropped": dict(bench.dropped),
        "base_accuracy": round(sum(base) / n, 4) if n else None,
        "tuned_accuracy": round(sum(tuned) / n, 4) if n else None,
        "difference": paired_bootstrap(n, mean_of(base), mean_of(tuned), seed=seed),
    }


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    *,
    max_examples: int,
    max_new_tokens: int,
    repetition_penalty: float = 1.0,
    batch_size: int = 1,
    seed: int = 0,
    benchmarks: Sequence[tuple[str, Path]] = (),
    max_benchmark_questions: int = 200,
    system_prompt: str | None = None,
    dropped: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Answers side by side, scores with intervals, how answers end, benchmark accuracies.

    ``model`` is the trained PeftModel; ``dropped`` counts held-out examples the dataset filters
    removed before evaluation (they are reported, not hidden). ``batch_size`` questions are
    answered at once, base and tuned alike (the same greedy answers as one at a time).
    """
    chosen = sample_questions(examples, max_examples, seed=seed)
    model.eval()
    prompts = [e.messages[:-1] for e in chosen if e.messages is not None]
    ask = {
        "max_new_tokens": max_new_tokens,
        "repetition_penalty": repetition_penalty,
        "batch_size": batch_size,
    }
    base = answer_questions(model, tokenizer, prompts, adapter=False, **ask)
    tuned = answer_questions(model, tokenizer, prompts, adapter=True, **ask)
    answers = [
        {
            "question": b["question"],
            "reference": e.messages[-1]["content"],
            "base": b["answer"],
            "tuned": t["answer"],
            "base_stopped": b["stopped"],
            "tuned_stopped": t["stopped"],
            "base_tokens": b["tokens"],
            "tuned_tokens": t["tokens"],
        }
        for e, b, t in zip(chosen, base, tuned, strict=True)
        if e.messages is not None
    ]
    compared = compare(
        [a["base"] for a in answers],
        [a["tuned"] for a in answers],
        [a["reference"] for a in answers],
        seed=seed,
    )
    return {
        "examples": len(answers),
        "held_out_examples": len(examples),
        "dropped_before_evaluation": dict(dropped or {}),
        "decoding": {
            "greedy": True,
            "max_new_tokens": max_new_tokens,
            "repetition_penalty": repetition_penalty,
            "batch_size": batch_size,
        },
        "sampling": {"seed": seed, "distinct_questions": True},
        **compared,
        "generation": {
            model_name: generation_stats(
                [
                    {
                        "answer": a[model_name],
                        "stopped": a[f"{model_name}_stopped"],
                        "tokens": a[f"{model_name}_tokens"],
                    }
                    for a in answers
                ]
            )
            for model_name in ("base", "tuned")
        },
        "benchmarks": [
            run_benchmark(
                model,
                tokenizer,
                choice.load(name, path, limit=max_benchmark_questions),
                system_prompt=system_prompt,
                seed=seed,
            )
            for name, path in benchmarks
        ],
        "meteor_note": None if meteor_available() else "METEOR skipped: WordNet not installed",
        "answers": answers,
    }
