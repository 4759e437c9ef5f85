"""A job's first two stages: its data prepared while its model loads (issue 13).

Preparation needs only the tokenizer, which loads in a second: the data is prepared in a thread
while the base model loads (or is found prepared already: ``core.data.prepared_cache``). On
Unsloth workers Unsloth is imported first, as it must be before transformers is used.

The model of the job a worker process runs is held here until the job is over, then handed back
(``give_back``): its base is kept for the next job on the same base (``load(keep=True)``).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from core.base_models import hub_call
from core.data import prepared_cache
from core.data.preference import prepare_job
from core.data.prepare import Prepared
from core.errors import MedtuneError
from core.settings import Settings
from core.spec.job import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStage

log = logging.getLogger(__name__)

# The Loaded of the job this thread runs, until it is handed back (a training worker runs one
# job at a time, in one thread; per thread, a job never hands back another one's model).
_local = threading.local()


def _running() -> list[Any]:
    if not hasattr(_local, "running"):
        _local.running = []
    running: list[Any] = _local.running
    return running


class Clock(Protocol):
    def start(self, name: str | None, **fields: Any) -> None: ...


def give_back() -> None:
    """Hand back the model of the job that ran last (its base is kept if it was loaded to be)."""
    from core.training import engines

    running = _running()
    while running:
        engines.give_back(running.pop())


def _tokenizer(spec: JobSpec, model_path: str) -> Any:
    from transformers import AutoTokenizer

    return hub_call(
        spec.model.base_model,
        AutoTokenizer.from_pretrained,
        model_path,
        revision=spec.model.revision,
    )


def _prepare(spec: JobSpec, tokenizer: Any, key: str | None, settings: Settings) -> Prepared:
    prepared = prepare_job(spec, tokenizer)  # sft examples, or dpo / orpo pairs (not cached)
    if key is not None and isinstance(prepared, Prepared):
        prepared_cache.write(
            settings.prepared_cache_dir, key, prepared, cap_bytes=settings.prepared_cache_bytes
        )
    return prepared  # type: ignore[return-value]  # dpo / orpo: PreparedPairs, same fields


def _cached(
    spec: JobSpec, tokenizer: Any, settings: Settings, job_dir: Path
) -> tuple[str | None, Prepared | None]:
    if not settings.prepared_cache_bytes or spec.training.method != "sft":
        return None, None
    key = prepared_cache.cache_key(spec, tokenizer)
    if key is None:
        return None, None
    prepared_cache.record_for_job(job_dir, key)  # before the entry exists: DELETE finds it
    return key, prepared_cache.read(settings.prepared_cache_dir, key)


def data_and_model(
    job_id: str,
    spec: JobSpec,
    model_path: str,
    *,
    settings: Settings,
    job_dir: Path,
    clock: Clock,
    load_model: Callable[[], Any],
) -> tuple[Prepared, Any]:
    """The prepared data and the loaded model (stage seconds: ``preparing_data`` counts the wait
    for the data after the model loaded). A dataset the gate refuses keeps its statistics on the
    job (GET /jobs/{id}/dataset shows why)."""
    from core.training import engines

    give_back()
    if engines.pick_engine(spec) == "unsloth":
        import unsloth  # noqa: F401  (before transformers: it patches it)
    tokenizer = _tokenizer(spec, model_path)
    key, prepared = _cached(spec, tokenizer, settings, job_dir)
    notes = []
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
    future: Future[Prepared] | None = None
    if prepared is not None:
        notes.append(
            "prepared data reused: an earlier job prepared the same data (same files, "
            "tokenizer and dataset settings), so nothing was tokenized"
        )
    else:
        context = contextvars.copy_context()  # the job's id on the thread's log lines
        future = pool.submit(context.run, _prepare, spec, tokenizer, key, settings)
    try:
        clock.start("loading_model", stage=JobStage.training)
        loaded = load_model()
        _running().append(loaded)
        if future is not None:
            clock.start("preparing_data")
            prepared = future.result()
    except MedtuneError as exc:
        if stats := getattr(exc, "dataset_stats", None):
            with session_scope(settings.db_url) as s:
                jobs.set_fields(s, job_id, dataset_stats=stats)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    assert prepared is not None
    with session_scope(settings.db_url) as s:
        jobs.set_fields(s, job_id, dataset_stats=prepared.stats)
        for note in notes:
            jobs.add_note(s, job_id, note)
    return prepared, loaded
