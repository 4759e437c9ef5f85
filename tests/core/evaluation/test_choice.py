"""Multiple-choice benchmarks: the file layouts users bring, and option scoring on SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.data.example import Example
from core.errors import MedtuneError
from core.evaluation import choice
from core.evaluation.run import sample_questions


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_answers_by_index_letter_or_text_and_bad_rows_counted(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "mcq.jsonl",
        [
            {"question": "Q1?", "options": ["a", "b", "c"], "answer": 2},
            {"question": "Q2?", "options": ["a", "b"], "answer": "B"},
            {"question": "Q3?", "options": {"A": "x", "B": "y"}, "answer": "y"},
            {"question": "Q4?", "options": ["a"], "answer": 0},
            {"question": "Q5?", "options": ["a", "b"], "answer": "z"},
            {"options": ["a", "b"], "answer": 0},
            "{not json",
        ],
    )
    bench = choice.load("mcq", path, limit=100)
    assert [q.answer for q in bench.questions] == [2, 1, 1]
    assert bench.dropped == {
        "fewer_than_two_options": 1,
        "answer_not_an_option": 1,
        "no_question": 1,
        "invalid_json": 1,
    }
    assert len(choice.load("mcq", path, limit=2).questions) == 2


def test_the_shipped_sample_reads_whole(tmp_path: Path) -> None:
    path = choice.resolve_file("sample:medical_mcq", roots=[], uploads=tmp_path)
    bench = choice.load("sample", path, limit=1000)
    assert len(bench.questions) == 20 and not bench.dropped


def test_paths_outside_the_roots_are_refused(tmp_path: Path) -> None:
    outside = _write(tmp_path / "mcq.jsonl", [])
    with pytest.raises(MedtuneError) as info:
        choice.resolve_file(str(outside), roots=[tmp_path / "data"], uploads=tmp_path / "up")
    assert info.value.code == "benchmark_path_not_allowed"
    with pytest.raises(MedtuneError) as info:
        choice.resolve_file("sample:nope", roots=[], uploads=tmp_path)
    assert info.value.code == "dataset_not_found"


def test_the_model_prefers_its_own_continuation(model_dir: Path, tokenizer: Any) -> None:
    """What the model would say scores above gibberish: the log-likelihoods are read at the
    right positions (an off-by-one would score the wrong tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    question = choice.Question("What is a fever?", ["", "zq xv qq"], 0)
    prompt = choice.render(
        tokenizer, choice.prompt_messages(question, None), add_generation_prompt=True
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    own = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    question.options[0] = own
    scores = choice.option_loglikelihoods(model, tokenizer, question, system_prompt=None)
    assert scores[0] > scores[1]
    bench = choice.Benchmark("b", [question])
    assert choice.correct(model, tokenizer, bench, adapter=False, system_prompt=None) == [1.0]


def test_questions_are_sampled_distinct_across_the_set() -> None:
    def qa(q: str) -> Example:
        return Example(
            messages=[{"role": "user", "content": q}, {"role": "assistant", "content": "a"}]
        )

    # Two documents' worth of repeated questions first, then many others.
    examples = [qa("What is X?")] * 10 + [qa("What is Y?")] * 10 + [qa(f"Q{i}?") for i in range(40)]
    chosen = sample_questions(examples, 12, seed=0)
    questions = [e.messages[0]["content"] for e in chosen]  # type: ignore[index]
    assert len(set(questions)) == 12
    assert sum(q.startswith("Q") for q in questions) >= 8
    assert sample_questions(examples, 12, seed=0) == chosen
    assert sample_questions(examples, 12, seed=1) != chosen
    assert sample_questions([Example(text="ready text")], 5, seed=0) == []
