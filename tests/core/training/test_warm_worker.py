"""A worker's second job on the same base and data (issue 13): the base is not loaded again and
the data not tokenized again, and the job trains exactly as the first did (same first loss);
deleting the jobs deletes the prepared data they shared."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.pipeline import run_job
from core.settings import Settings
from core.spec import JobSpec
from core.store import jobs, purge
from core.store.db import session_scope
from core.store.models import JobStatus
from core.training import base_cache
from tests.helpers import recipe_spec, tiny_dataset

pytestmark = pytest.mark.slow


def _run(settings: Settings, spec: JobSpec) -> tuple[str, list[str], float]:
    url = settings.db_url
    with session_scope(url) as s:
        job_id = jobs.create_job(s, spec).id
    status = run_job(job_id, settings, worker="w")
    with session_scope(url) as s:
        job = jobs.get_job(s, job_id)
        rows, _ = jobs.metrics_page(s, job_id, after_step=-1, limit=10)
        assert status == JobStatus.succeeded, (job.error_code, job.error_message)
        loss = next(r.loss for r in rows if r.loss is not None)
        return job_id, list(job.notes), loss


def test_the_second_job_reuses_the_base_and_the_prepared_data(
    tmp_path: Path, sqlite_url: str, model_cache: Path
) -> None:
    base_cache.release("test start")
    data = tiny_dataset(tmp_path / "tiny.jsonl", rows=12)
    spec = JobSpec.model_validate(recipe_spec(data, max_steps=1, save_steps=0))
    settings = Settings(home=tmp_path / "home", database_url=sqlite_url, model_cache=model_cache)
    try:
        first, first_notes, first_loss = _run(settings, spec)
        assert base_cache.kept_key() is not None
        second, second_notes, second_loss = _run(settings, spec)
    finally:
        base_cache.release("test end")
    assert not any("reused" in n for n in first_notes)
    assert any(n.startswith("base model reused") for n in second_notes)
    assert any(n.startswith("prepared data reused") for n in second_notes)
    assert second_loss == first_loss  # same data, same seeded LoRA, same base
    entries = list(settings.prepared_cache_dir.glob("*.json"))
    assert len(entries) == 1
    with session_scope(sqlite_url) as s:
        purge.delete_job(
            s,
            second,
            owner=None,
            artifacts_dir=settings.artifacts_dir,
            prepared_cache_dir=settings.prepared_cache_dir,
        )
    assert not entries[0].exists()  # job 1's data too: the same entry, gone with job 2
    assert (settings.artifacts_dir / first).exists()
