"""DPO and ORPO jobs through the worker's pipeline on CUDA with the Unsloth engine (GPU
machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from core.pipeline import run_job
from core.settings import Settings
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from core.training.preference import REWARDS
from tests.helpers import recipe_spec

pytestmark = pytest.mark.gpu


def test_unsloth_dpo_job_logs_rewards_and_saves_the_trained_adapter_alone(
    tmp_path: Path, sqlite_url: str, tiny_llama3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDTUNE_MODEL_ROOTS", json.dumps([str(tiny_llama3.parent)]))
    raw = recipe_spec(
        "sample:medical_preference",
        engine="unsloth",
        method="dpo",
        max_steps=4,
        save_steps=2,
        warmup_steps=0,
        preference={"beta": 0.1, "max_prompt_length": 128, "max_completion_length": 128},
    )
    raw["model_config"].update(base_model=str(tiny_llama3), max_seq_length=256)
    raw["lora_config"]["use_gradient_checkpointing"] = "unsloth"
    raw["training_dataset"]["validation_share"] = 0.1
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, JobSpec.model_validate(raw)).id
    status = run_job(job_id, Settings(home=tmp_path, database_url=sqlite_url), worker="gpu0")
    with session_scope(sqlite_url) as s:
        job = jobs.get_job(s, job_id)
        rows, _ = jobs.metrics_page(s, job_id, after_step=-1, limit=100)

    assert status == JobStatus.succeeded, (job.error_code, job.error_message)
    assert job.engine == "unsloth"
    assert [r.step for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0].eval_rewards_margin == 0.0  # the reference is the model it starts from
    trained = rows[1:]
    assert all(r.rewards_margin is not None and r.rewards_accuracy is not None for r in trained)
    assert all((r.peak_memory_mb or 0) > 0 for r in trained)
    assert rows[-1].rewards_margin > 0  # lr 2e-3 on the pairs: the chosen answers gain
    adapter = Path(job.adapter_dir or "")
    assert not (adapter / "ref").exists()
    assert not any(
        ".ref." in name for name in load_file(str(adapter / "adapter_model.safetensors"))
    )


def test_unsloth_orpo_job_trains_with_no_reference_and_logs_rewards(
    tmp_path: Path, sqlite_url: str, tiny_llama3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDTUNE_MODEL_ROOTS", json.dumps([str(tiny_llama3.parent)]))
    raw = recipe_spec(
        "sample:medical_preference",
        engine="unsloth",
        method="orpo",
        max_steps=4,
        save_steps=2,
        warmup_steps=0,
        preference={"beta": 0.1, "max_prompt_length": 128, "max_completion_length": 128},
    )
    raw["model_config"].update(base_model=str(tiny_llama3), max_seq_length=256)
    raw["lora_config"]["use_gradient_checkpointing"] = "unsloth"
    raw["training_dataset"]["validation_share"] = 0.1
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, JobSpec.model_validate(raw)).id
    status = run_job(job_id, Settings(home=tmp_path, database_url=sqlite_url), worker="gpu0")
    with session_scope(sqlite_url) as s:
        job = jobs.get_job(s, job_id)
        rows, _ = jobs.metrics_page(s, job_id, after_step=-1, limit=100)

    assert status == JobStatus.succeeded, (job.error_code, job.error_message)
    assert job.engine == "unsloth"
    assert any("ORPOTrainer" in n for n in job.notes), job.notes
    assert [r.step for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0].eval_rewards_margin is not None and rows[-1].eval_rewards_margin is not None
    trained = rows[1:]
    assert all(getattr(r, k) is not None for r in trained for k in (*REWARDS.values(), "loss"))
    # ORPO's rewards are beta x the answers' mean log-probabilities: below zero.
    assert all(r.rewards_chosen < 0 and r.rewards_rejected < 0 for r in trained)
    assert all((r.peak_memory_mb or 0) > 0 for r in trained)
    # lr 2e-3: the held-out pairs' ORPO loss (mostly the chosen answers' NLL) falls.
    assert rows[0].eval_loss is not None and rows[-1].eval_loss is not None
    assert rows[-1].eval_loss < rows[0].eval_loss
    # No reference adapter: ORPO has none, and the saved adapter is the trained one alone.
    adapter = Path(job.adapter_dir or "")
    assert not (adapter / "ref").exists()
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert weights and not any(".ref." in name for name in weights)
