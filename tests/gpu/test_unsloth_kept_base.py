"""On CUDA with Unsloth (run on the GPU machine): a worker's second job reuses the base its first
job left, patched by Unsloth once, and starts exactly as the first did (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.pipeline import run_job
from core.settings import Settings
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from core.training import base_cache
from tests.helpers import recipe_spec, tiny_dataset

pytestmark = pytest.mark.gpu


def _run(settings: Settings, spec: JobSpec) -> tuple[list[str], list[float]]:
    with session_scope(settings.db_url) as s:
        job_id = jobs.create_job(s, spec).id
    status = run_job(job_id, settings, worker="gpu0")
    with session_scope(settings.db_url) as s:
        job = jobs.get_job(s, job_id)
        rows, _ = jobs.metrics_page(s, job_id, after_step=-1, limit=100)
        assert status == JobStatus.succeeded, (job.error_code, job.error_message)
        return list(job.notes), [r.loss for r in rows if r.loss is not None]


def test_the_second_unsloth_job_reuses_the_patched_base(
    tmp_path: Path, sqlite_url: str, tiny_llama3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDTUNE_MODEL_ROOTS", json.dumps([str(tiny_llama3.parent)]))
    data = tiny_dataset(tmp_path / "tiny.jsonl", rows=16)
    raw = recipe_spec(data, engine="unsloth", max_steps=6, save_steps=0, learning_rate=2e-3)
    raw["model_config"].update(base_model=str(tiny_llama3), max_seq_length=512)
    raw["lora_config"]["use_gradient_checkpointing"] = "unsloth"
    spec = JobSpec.model_validate(raw)
    # The checkpointing the spec asks for is what this test exercises (an H200 would skip it).
    settings = Settings(home=tmp_path, database_url=sqlite_url, skip_checkpointing_when_room=False)
    base_cache.release("test start")
    try:
        first_notes, first = _run(settings, spec)
        assert base_cache.kept_key() is not None, "the first job's base was not kept"
        second_notes, second = _run(settings, spec)
    finally:
        base_cache.release("test end")
    assert not any(n.startswith("base model reused") for n in first_notes)
    assert any(n.startswith("base model reused") for n in second_notes), second_notes
    assert any(n.startswith("prepared data reused") for n in second_notes), second_notes
    assert first[-1] < first[0]  # job 1's adapter moved: a leftover would lower job 2's start
    assert second[0] == pytest.approx(first[0], rel=1e-3)
    assert second[-1] == pytest.approx(first[-1], rel=2e-2)
