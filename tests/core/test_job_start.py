"""A job's data prepared while its model loads (core/job_start.py): the load starts at once, and
a load that fails fails the job without waiting for the data."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from core import job_start
from core.errors import MedtuneError
from core.settings import Settings
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from tests.helpers import recipe_spec


class _Clock:
    def __init__(self) -> None:
        self.stages: list[str | None] = []

    def start(self, name: str | None, **fields: Any) -> None:
        self.stages.append(name)


def _job(sqlite_url: str, tmp_path: Path, model_cache: Path) -> tuple[str, JobSpec, Settings]:
    spec = JobSpec.model_validate(recipe_spec("sample:medical_qa"))
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, spec).id
    settings = Settings(home=tmp_path, database_url=sqlite_url, model_cache=model_cache)
    return job_id, spec, settings


@pytest.fixture
def no_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(job_start, "_tokenizer", lambda spec, path: object())


@pytest.mark.usefixtures("no_tokenizer")
def test_a_model_that_fails_to_load_does_not_wait_for_the_data(
    tmp_path: Path, sqlite_url: str, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, spec, settings = _job(sqlite_url, tmp_path, model_cache)
    release, preparing = threading.Event(), threading.Event()

    def slow_prepare(spec: JobSpec, tokenizer: Any) -> Any:
        preparing.set()
        release.wait(20)  # minutes of tokenizing, in the real thing
        return SimpleNamespace(stats={})

    def load_fails(step_tokens: Any) -> Any:
        assert preparing.wait(10)
        raise MedtuneError("the base model does not fit", code="model_load_failed")

    monkeypatch.setattr(job_start, "prepare_job", slow_prepare)
    monkeypatch.setattr(job_start, "_cache_key", lambda *args: None)
    started = time.monotonic()
    try:
        with pytest.raises(MedtuneError, match="does not fit"):
            job_start.data_and_model(
                job_id,
                spec,
                "unused",
                settings=settings,
                job_dir=tmp_path / "job",
                clock=_Clock(),
                load_model=load_fails,
            )
        assert time.monotonic() - started < 10
    finally:
        release.set()


@pytest.mark.usefixtures("no_tokenizer")
def test_the_cache_key_is_computed_while_the_model_loads(
    tmp_path: Path, sqlite_url: str, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hashing the source files (the cache key) runs in the prepare thread: the load does not
    wait for it."""
    job_id, spec, settings = _job(sqlite_url, tmp_path, model_cache)
    loading = threading.Event()
    seen: dict[str, Any] = {}

    def cache_key(spec: JobSpec, tokenizer: Any) -> str | None:
        seen["thread"] = threading.current_thread().name
        seen["load_had_started"] = loading.wait(10)
        return None

    def load(step_tokens: Any) -> Any:
        loading.set()
        return "model"

    monkeypatch.setattr(job_start.prepared_cache, "cache_key", cache_key)
    monkeypatch.setattr(job_start, "prepare_job", lambda spec, tok: SimpleNamespace(stats={}))
    clock = _Clock()
    prepared, loaded = job_start.data_and_model(
        job_id,
        spec,
        "unused",
        settings=settings,
        job_dir=tmp_path / "job",
        clock=clock,
        load_model=load,
    )
    job_start._running().clear()
    assert loaded == "model" and prepared.stats == {}
    assert seen == {"thread": seen["thread"], "load_had_started": True}
    assert seen["thread"].startswith("prepare")
    assert clock.stages == ["loading_model", "preparing_data"]
