"""DPO and ORPO jobs on the CPU (SmolLM2, TRL's trainers, a few steps on short pairs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from core.data.preference import prepare_pairs
from core.pipeline import run_job
from core.settings import Settings
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from core.training import engines, preference
from core.training.sink import ListSink
from core.training.sink_callback import FAULT_OOM_ENV
from tests.helpers import ROOT, recipe_spec

SAMPLE = ROOT / "core" / "samples" / "medical_preference_sample.jsonl"
REWARDS = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy")


def pairs_file(path: Path, rows: int) -> Path:
    path.write_text("\n".join(SAMPLE.read_text().splitlines()[:rows]) + "\n")
    return path


def preference_spec(dataset: Path | str, method: str, **training: Any) -> dict[str, Any]:
    """Short pairs (prompts cut to 48 tokens, answers to 24), so a step takes seconds."""
    knobs = {"learning_rate": 5e-3, "warmup_steps": 0, "save_steps": 0, **training}
    short = {"beta": 0.1, "max_prompt_length": 48, "max_completion_length": 24}
    spec = recipe_spec(dataset, method=method, preference=short, **knobs)
    spec["training_dataset"]["max_truncated_share"] = 1.0  # the answers are cut on purpose
    return spec


@pytest.mark.slow
def test_a_dpo_job_raises_the_chosen_margin_and_stores_the_rewards(
    tmp_path: Path, sqlite_url: str, model_cache: Path
) -> None:
    spec = preference_spec(pairs_file(tmp_path / "pairs.jsonl", 10), "dpo", max_steps=2)
    spec["training_dataset"]["validation_share"] = 0.2  # two held-out pairs
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, JobSpec.model_validate(spec)).id
    settings = Settings(home=tmp_path, database_url=sqlite_url, model_cache=model_cache)
    status = run_job(job_id, settings, worker="w")
    with session_scope(sqlite_url) as s:
        job = jobs.get_job(s, job_id)
        rows, _ = jobs.metrics_page(s, job_id, after_step=-1, limit=100)
    assert status == JobStatus.succeeded, (job.error_code, job.error_message)
    assert job.dataset_stats["method"] == "dpo" and job.dataset_stats["validation_examples"] == 2
    assert [r.step for r in rows] == [0, 1, 2]
    # Before any update the tuned model is its reference: every reward is 0.
    assert rows[0].eval_rewards_margin == 0.0 and rows[0].eval_loss == pytest.approx(0.6931, 1e-3)
    assert rows[1].rewards_margin == 0.0 and rows[1].rewards_chosen == 0.0
    assert all(getattr(r, k) is not None for r in rows[1:] for k in REWARDS)
    # One step on the pairs: the chosen answers gain on the rejected ones, held out too.
    assert rows[2].rewards_margin > 0 and rows[2].rewards_accuracy > 0
    assert rows[2].eval_rewards_margin > rows[0].eval_rewards_margin
    assert rows[2].eval_loss < rows[0].eval_loss
    # The saved adapter is the trained one alone: TRL's frozen "ref" copy is gone.
    adapter = Path(job.adapter_dir)
    assert not (adapter / "ref").exists()
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert not any(".ref." in name for name in weights)
    assert any(w.abs().sum() > 0 for n, w in weights.items() if "lora_B" in n)  # B starts at 0


def test_dpo_from_an_adapter_scores_against_it_and_raises_the_margin(
    tmp_path: Path, model_dir: Path, tokenizer: Any
) -> None:
    """Continued from an adapter, the reference is that adapter (not the base): before the
    first update every reward is 0; after it the chosen answers gain on the rejected ones."""
    import torch

    spec = JobSpec.model_validate(
        preference_spec("sample:medical_preference", "dpo", max_steps=2, eval_strategy="end")
    )
    first = engines.load(spec, str(model_dir))
    with torch.no_grad():  # an adapter far from the base
        for name, param in first.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    first.model.save_pretrained(str(tmp_path / "adapter"))
    loaded = engines.load(spec, str(model_dir), init_adapter=str(tmp_path / "adapter"))
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if "lora_B" in n}
    prepared = prepare_pairs(spec, tokenizer)
    sink = ListSink()
    outcome = preference.train(
        spec,
        loaded,
        prepared.train[:4],
        output_dir=tmp_path / "out",
        sink=sink,
        eval_items=prepared.train[:2],
    )
    rows = {r["step"]: r for r in sink.rows}
    assert outcome.steps == 2 and sorted(rows) == [0, 1, 2]
    assert rows[0]["eval_rewards_margin"] == 0.0 and rows[0]["eval_loss"] == pytest.approx(
        0.6931, 1e-3
    )
    assert rows[1]["rewards_chosen"] == 0.0 and rows[1]["rewards_rejected"] == 0.0
    assert rows[2]["rewards_margin"] > 0
    assert rows[2]["eval_rewards_margin"] > 0 and rows[2]["eval_loss"] < rows[0]["eval_loss"]
    assert list(loaded.model.peft_config) == ["default"]  # the frozen reference copy is gone
    after = dict(loaded.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.slow
def test_after_an_out_of_memory_retry_dpo_still_scores_against_the_start(
    tmp_path: Path, sqlite_url: str, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry builds a second trainer on trained weights; its reference must still be the
    adapter as loaded (zero here), or the retried step's rewards would be 0."""
    monkeypatch.setenv(FAULT_OOM_ENV, "2")
    spec = preference_spec(pairs_file(tmp_path / "pairs.jsonl", 8), "dpo", max_steps=2)
    spec["training_config"]["save_steps"] = 1
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, JobSpec.model_validate(spec)).id
    settings = Settings(home=tmp_path, database_url=sqlite_url, model_cache=model_cache)
    status = run_job(job_id, settings, worker="w")
    with session_scope(sqlite_url) as s:
        job = jobs.get_job(s, job_id)
        rows, _ = jobs.metrics_page(s, job_id, after_step=-1, limit=100)
    assert status == JobStatus.succeeded, (job.error_code, job.error_message)
    assert any("retrying from step 1 with micro-batch 1" in n for n in job.notes), job.notes
    assert [r.step for r in rows] == [1, 2] and rows[0].rewards_margin == 0.0
    assert rows[1].rewards_chosen != 0.0 and rows[1].rewards_margin != 0.0
    # Checkpoints hold the trained adapter alone (a "ref" subfolder is what a resume loads).
    saved = list((tmp_path / "jobs" / job_id / "outputs").rglob("adapter_model.safetensors"))
    assert saved and all(p.parent.name.startswith("checkpoint-") for p in saved), saved


@pytest.mark.slow
def test_an_orpo_job_trains_and_logs_its_rewards(
    tmp_path: Path, sqlite_url: str, model_cache: Path
) -> None:
    spec = preference_spec(pairs_file(tmp_path / "pairs.jsonl", 6), "orpo", max_steps=2)
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, JobSpec.model_validate(spec)).id
    settings = Settings(home=tmp_path, database_url=sqlite_url, model_cache=model_cache)
    assert run_job(job_id, settings, worker="w") == JobStatus.succeeded
    with session_scope(sqlite_url) as s:
        rows, _ = jobs.metrics_page(s, job_id, after_step=-1, limit=100)
        notes = jobs.get_job(s, job_id).notes
    assert [r.step for r in rows] == [1, 2]
    assert all(getattr(r, k) is not None for r in rows for k in (*REWARDS, "loss"))
    # ORPO's rewards are beta x the answers' mean log-probabilities: below zero.
    assert all(r.rewards_chosen < 0 for r in rows)
    assert any("ORPOTrainer" in n for n in notes), json.dumps(notes)
