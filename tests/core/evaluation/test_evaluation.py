"""Evaluation: scores that move the right way, reproducible answers, the stage in the pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.data.example import Example
from core.evaluation import EVALUATION_FILE, evaluate, score
from core.pipeline import run_job
from core.settings import Settings
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from tests.helpers import recipe_spec, tiny_dataset

REFS = ["High blood pressure damages arteries over time.", "Drink water and rest."]


def test_scores_reward_overlap_and_say_when_meteor_is_missing() -> None:
    exact = score(REFS, REFS)
    assert exact["rouge1"] == exact["rougeL"] == 1.0 and exact["bleu"] == pytest.approx(100)
    unrelated = score(["Bananas are yellow fruit.", "The sky looks blue."], REFS)
    assert unrelated["rougeL"] < 0.2 and unrelated["bleu"] < 5
    partial = score(["High blood pressure hurts arteries.", "Rest."], REFS)
    assert unrelated["rougeL"] < partial["rougeL"] < exact["rougeL"]
    try:
        from nltk.corpus import wordnet

        wordnet.synsets("dog")
        has_wordnet = True
    except LookupError:
        has_wordnet = False
    assert (exact["meteor"] is not None) == has_wordnet


def test_evaluation_is_reproducible(model_dir: Path, tokenizer: Any) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    examples = [
        Example(
            messages=[
                {"role": "user", "content": "What is a fever?"},
                {"role": "assistant", "content": "A body temperature above normal."},
            ]
        ),
        Example(
            messages=[
                {"role": "user", "content": "What is anemia?"},
                {"role": "assistant", "content": "Too few red blood cells."},
            ]
        ),
    ]
    first = evaluate(model, tokenizer, examples, max_examples=2, max_new_tokens=12, batch_size=2)
    second = evaluate(model, tokenizer, examples, max_examples=2, max_new_tokens=12)
    # Both questions in one batch, or one at a time (issue #20): the same evaluation.
    assert (first["decoding"]["batch_size"], second["decoding"]["batch_size"]) == (2, 1)
    del first["decoding"]["batch_size"], second["decoding"]["batch_size"]
    assert first == second
    assert first["examples"] == 2 and first["answers"][0]["reference"].startswith("A body")
    # A fresh LoRA starts at zero: the tuned model answers exactly as the base does.
    assert [a["base"] for a in first["answers"]] == [a["tuned"] for a in first["answers"]]


@pytest.mark.slow
def test_pipeline_evaluates_the_held_out_split(
    tmp_path: Path, sqlite_url: str, model_cache: Path
) -> None:
    data = tiny_dataset(tmp_path / "tiny.jsonl", rows=12)
    raw = recipe_spec(data, max_steps=2)
    raw["training_dataset"]["validation_share"] = 0.25
    raw["training_dataset"]["min_examples"] = 1
    raw["evaluation_config"] = {
        "enabled": True,
        "max_examples": 2,
        "max_new_tokens": 12,
        "benchmarks": [{"name": "mcq", "file": "sample:medical_mcq"}],
        "max_benchmark_questions": 3,
    }
    spec = JobSpec.model_validate(raw)
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, spec).id
    settings = Settings(home=tmp_path, database_url=sqlite_url, model_cache=model_cache)
    assert run_job(job_id, settings, worker="w") == JobStatus.succeeded
    result = json.loads((tmp_path / "jobs" / job_id / EVALUATION_FILE).read_text())
    assert result["examples"] == 2
    assert (
        set(result["base"])
        == set(result["tuned"])
        == {"rouge1", "rouge2", "rougeL", "bleu", "meteor"}
    )
    with session_scope(sqlite_url) as s:
        job = jobs.get_job(s, job_id)
    assert job.dataset_stats and job.dataset_stats["validation_examples"] == 3
    assert any(n.startswith("evaluated on 2 held-out examples") for n in job.notes)
    # Every score has its interval and verdict; how answers end; the benchmark's accuracy.
    assert set(result["difference"]) == {"rouge1", "rouge2", "rougeL", "bleu", "meteor"}
    assert result["difference"]["rougeL"]["verdict"] in {
        "better",
        "worse",
        "no measurable difference",
    }
    assert set(result["generation"]["tuned"]) == {
        "stop_rate",
        "mean_tokens",
        "loop_rate",
        "repeated_4gram",
    }
    (bench,) = result["benchmarks"]
    assert bench["name"] == "mcq" and bench["questions"] == 3
    assert 0 <= bench["base_accuracy"] <= 1 and bench["difference"] is not None


@pytest.mark.slow
def test_ready_made_prompt_texts_skip_scoring_with_a_note_not_an_error(
    tmp_path: Path, sqlite_url: str, model_cache: Path
) -> None:
    """Rows that are whole prompt texts (the recipe's own `prompt` column) hold no question and
    answer to score: the job succeeds and says so (it used to end in internal_error after
    training, from a mean over nothing)."""
    rows = [
        {"prompt": f"<|im_start|>user\nWhat is condition {i}?<|im_end|>\n<|im_start|>assistant\n"
         f"Condition {i} is a made-up disease for tests.<|im_end|>\n"}
        for i in range(16)
    ]  # fmt: skip
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = recipe_spec(data, max_steps=2)
    raw["training_dataset"]["validation_share"] = 0.25
    raw["evaluation_config"] = {"enabled": True, "max_examples": 2, "max_new_tokens": 8}
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, JobSpec.model_validate(raw)).id
    settings = Settings(home=tmp_path, database_url=sqlite_url, model_cache=model_cache)
    assert run_job(job_id, settings, worker="w") == JobStatus.succeeded
    with session_scope(sqlite_url) as s:
        job = jobs.get_job(s, job_id)
    assert job.error_code is None
    assert any("no held-out question/answer pairs to score" in n for n in job.notes), job.notes
    result = json.loads((tmp_path / "jobs" / job_id / EVALUATION_FILE).read_text())
    assert result["examples"] == 0 and result["difference"]["rougeL"] is None


@pytest.mark.slow
def test_an_evaluation_that_crashes_keeps_the_trained_adapter(
    tmp_path: Path, sqlite_url: str, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adapter is saved before the evaluation stage: training's work survives its failure."""
    import core.evaluation.job

    def crash(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(core.evaluation.job, "evaluate_job", crash)
    data = tiny_dataset(tmp_path / "tiny.jsonl", rows=12)
    raw = recipe_spec(data, max_steps=1)
    raw["training_dataset"]["validation_share"] = 0.25
    raw["evaluation_config"] = {"enabled": True, "max_examples": 2, "max_new_tokens": 4}
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, JobSpec.model_validate(raw)).id
    settings = Settings(home=tmp_path, database_url=sqlite_url, model_cache=model_cache)
    assert run_job(job_id, settings, worker="w") == JobStatus.failed
    adapter = tmp_path / "jobs" / job_id / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "adapter_config.json").is_file()
