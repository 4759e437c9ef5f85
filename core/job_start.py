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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from core.base_models import hub_call
from core.data import prepared_cache
from core.data.preference import prepare_job
from core.data.prepare import Prepared
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


def _cache_key(spec: JobSpec, tokenizer: Any, settings: Settings, job_dir: Path) -> str | None:
    if not settings.prepared_cache_bytes or spec.training.method != "sft":
        return None
    key = prepared_cache.cache_key(spec, tokenizer)  # hashes every source file
    if key is not None:
        prepared_cache.record_for_job(job_dir, key)  # before the entry exists: DELETE finds it
    return key


def _prepare(
    spec: JobSpec, tokenizer: Any, settings: Settings, job_dir: Path
) -> tuple[Prepared, bool]:
    """The job's data and whether it came from the cache. Runs in the prepare thread, the
    cache key too: hashing the source files must not hold back the model's load."""
    key = _cache_key(spec, tokenizer, settings, job_dir)
    if key is not None and (cached := prepared_cache.read(settings.prepared_cache_dir, key)):
        return cached, True
    prepared = prepare_job(spec, tokenizer)  # sft examples, or dpo / orpo pairs (not cached)
    if key is not None and isinstance(prepared, Prepared):
        prepared_cache.write(
            settings.prepared_cache_dir, key, prepared, cap_bytes=settings.prepared_cache_bytes
        )
    return prepared, False  # type: ignore[return-value]  # dpo / orpo: PreparedPairs


def _fullest_step(spec: JobSpec, prepared: Any) -> int | None:
    from core.training.checkpointing import step_tokens

    return step_tokens(spec, prepared.train) if isinstance(prepared, Prepared) else None


def data_and_model(
    job_id: str,
    spec: JobSpec,
    model_path: str,
    *,
    settings: Settings,
    job_dir: Path,
    clock: Clock,
    load_model: Callable[[Callable[[], int | None]], Any],
) -> tuple[Prepared, Any]:
    """The prepared data and the loaded model (stage seconds: ``preparing_data`` counts the wait
    for the data after the model loaded). A dataset the gate refuses keeps its statistics on the
    job (GET /jobs/{id}/dataset shows why)."""
    from core.training import engines

    give_back()
    if engines.pick_engine(spec) == "unsloth":
        import unsloth  # noqa: F401  (before transformers: it patches it)
    tokenizer = _tokenizer(spec, model_path)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
    context = contextvars.copy_context()  # the job's id on the thread's log lines
    future = pool.submit(context.run, _prepare, spec, tokenizer, settings, job_dir)
    try:
        clock.start("loading_model", stage=JobStage.training)

        def fullest_step() -> int | None:  # the model's checkpointing may depend on it
            clock.start("preparing_data")  # the wait for the data is the data's time
            prepared = future.result()[0]
            clock.start("loading_model")
            return _fullest_step(spec, prepared)

        loaded = load_model(fullest_step)
        _running().append(loaded)
        clock.start("preparing_data")
        prepared, reused = future.result()
    except BaseException as exc:
        # The job fails now: a model that did not load does not wait for the data (minutes).
        pool.shutdown(wait=False, cancel_futures=True)
        if stats := getattr(exc, "dataset_stats", None):
            with session_scope(settings.db_url) as s:
                jobs.set_fields(s, job_id, dataset_stats=stats)
        raise
    pool.shutdown(wait=True)
    notes = []
    if reused:
        notes.append(
            "prepared data reused: an earlier job prepared the same data (same files, "
            "tokenizer and dataset settings), so nothing was tokenized"
        )
    with session_scope(settings.db_url) as s:
        jobs.set_fields(s, job_id, dataset_stats=prepared.stats)
        for note in notes:
            jobs.add_note(s, job_id, note)
    return prepared, loaded
