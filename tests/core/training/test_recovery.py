"""Fault recovery in the worker's pipeline: injected CUDA OOM, cancel checkpoints, lapsed leases."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from core.pipeline import run_job
from core.settings import Settings
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.models import Job, JobStatus, utcnow
from core.training.sink_callback import FAULT_OOM_ENV
from tests.helpers import recipe_spec, tiny_dataset


def _settings(tmp_path: Path, url: str, model_cache: Path) -> Settings:
    return Settings(home=tmp_path, database_url=url, model_cache=model_cache)


@pytest.mark.slow
def test_injected_oom_retries_from_checkpoint_with_half_the_micro_batch(
    tmp_path: Path, sqlite_url: str, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_OOM_ENV, "3")
    data = tiny_dataset(tmp_path / "tiny.jsonl")
    raw = recipe_spec(data, max_steps=4, save_steps=2, report_to=["tensorboard", "mlflow"])
    spec = JobSpec.model_validate(raw)
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, spec).id
    status = run_job(job_id, _settings(tmp_path, sqlite_url, model_cache), worker="w")
    with session_scope(sqlite_url) as s:
        job = jobs.get_job(s, job_id)
        rows, _ = jobs.metrics_page(s, job_id, after_step=-1, limit=100)
    assert status == JobStatus.succeeded, (job.error_code, job.error_message)
    assert any("out of memory; retrying from step 2 with micro-batch 1 x 2" in n for n in job.notes)
    assert [r.step for r in rows] == [1, 2, 3, 4]  # nothing lost, nothing doubled
    # The retry reports to the job's one MLflow run: the same steps, each once.
    from mlflow.tracking import MlflowClient

    where = (job.tracking or {})["mlflow"]
    client = MlflowClient(tracking_uri=where["tracking_uri"])
    history = client.get_metric_history(where["run_id"], "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx([r.loss for r in rows])
    assert client.get_run(where["run_id"]).info.status == "FINISHED"
    outputs = tmp_path / "jobs" / job_id / "outputs" / "checkpoints"
    assert sorted(p.name for p in outputs.iterdir() if not p.name.startswith(".")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]


@pytest.mark.slow
def test_oom_at_micro_batch_one_fails_with_a_code(
    tmp_path: Path, sqlite_url: str, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_OOM_ENV, "1")
    data = tiny_dataset(tmp_path / "tiny.jsonl")
    spec = JobSpec.model_validate(recipe_spec(data, max_steps=2, per_device_train_batch_size=1))
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, spec).id
    assert run_job(job_id, _settings(tmp_path, sqlite_url, model_cache), worker="w") == "failed"
    with session_scope(sqlite_url) as s:
        job = jobs.get_job(s, job_id)
    assert job.error_code == "cuda_out_of_memory"
    assert "per_device_train_batch_size 1" in (job.error_message or "")


def test_lapsed_lease_requeues_only_that_job(sqlite_url: str) -> None:
    spec = JobSpec()
    with session_scope(sqlite_url) as s:
        lost, alive = jobs.create_job(s, spec).id, jobs.create_job(s, spec).id
        assert jobs.claim(s, lost, worker="dead", lease_s=60)
        assert jobs.claim(s, alive, worker="busy", lease_s=60)
        job = s.get(Job, lost)
        assert job is not None
        job.lease_expires_at = utcnow() - timedelta(seconds=1)
        s.add(job)
        s.commit()
        assert jobs.requeue_lapsed(s) == [lost]
        assert jobs.requeue_lapsed(s) == []  # idempotent
        assert jobs.get_job(s, lost).status == JobStatus.queued
        assert any("worker lost" in n for n in jobs.get_job(s, lost).notes)
        assert jobs.get_job(s, alive).status == JobStatus.running
        # The requeued job is claimable again, and counts its attempts.
        assert jobs.claim(s, lost, worker="new", lease_s=60)
        assert jobs.get_job(s, lost).attempts == 2
        # A lease is renewed only by the worker that holds it.
        assert not jobs.renew_lease(s, lost, worker="dead", lease_s=60)
        assert jobs.renew_lease(s, lost, worker="new", lease_s=60)


@pytest.mark.slow
def test_oom_without_the_skipped_checkpointing_retries_with_it_before_halving(
    tmp_path: Path, sqlite_url: str, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job the worker trained without the checkpointing it asked for (a card that seemed to
    have room; faked here) gets it back at its first out-of-memory, with its micro-batch kept."""
    from core.training import checkpointing

    monkeypatch.setattr(checkpointing, "free_cuda_bytes", lambda: 100 * 2**30)
    monkeypatch.setenv(FAULT_OOM_ENV, "3")
    data = tiny_dataset(tmp_path / "tiny.jsonl")
    raw = recipe_spec(data, max_steps=4, save_steps=2)
    raw["lora_config"]["use_gradient_checkpointing"] = True
    spec = JobSpec.model_validate(raw)
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, spec).id
    status = run_job(job_id, _settings(tmp_path, sqlite_url, model_cache), worker="w")
    with session_scope(sqlite_url) as s:
        job = jobs.get_job(s, job_id)
        rows, _ = jobs.metrics_page(s, job_id, after_step=-1, limit=100)
    assert status == JobStatus.succeeded, (job.error_code, job.error_message)
    assert any(n.startswith("gradient checkpointing skipped") for n in job.notes)
    assert any(
        "retrying from step 2 with gradient checkpointing, which the worker had skipped" in n
        for n in job.notes
    )
    assert not any("with micro-batch" in n for n in job.notes)
    assert [r.step for r in rows] == [1, 2, 3, 4]
    assert (job.stage_seconds or {}).keys() >= {"preparing_data", "loading_model", "training"}
