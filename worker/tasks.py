"""Tasks take ids and plain values, read the job store (the inference task gets what the API read
of the job instead), and delegate to core."""

from __future__ import annotations

import copy
import logging
import socket
import threading
from functools import lru_cache
from typing import Any

from celery.signals import worker_ready

from core.base_models import hub_call, resolve
from core.data.preview import preview_request
from core.errors import MedtuneError
from core.export.run import run_export
from core.inference.engine import InferenceEngine
from core.inference.stream import channel_for
from core.inference.task import build_request, serve
from core.inference.warm import freed, preload, send_freed, warm
from core.logs import install_celery_logging, job_context
from core.pipeline import run_job
from core.queue import (
    EXPORT_TASK,
    FREED_TASK,
    INFER_QUEUE,
    INFER_TASK,
    PREVIEW_TASK,
    RUN_JOB_TASK,
    WARM_TASK,
    serves_only_inference,
)
from core.settings import Settings, get_settings
from worker.celery_app import app, consumed_queues

# MEDTUNE_LOG_FORMAT=json: JSON lines; this module is imported before Celery sets up logging.
install_celery_logging()
log = logging.getLogger(__name__)


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job_task(self: Any, job_id: str) -> str:
    # Every line logged while the job runs (ours, transformers', celery's) carries its id.
    with job_context(job_id):
        return run_job(job_id, get_settings(), worker=self.request.hostname or socket.gethostname())


@app.task(name=EXPORT_TASK)
def export_task(
    job_id: str,
    *,
    formats: list[str],
    gguf_quantizations: list[str],
    push_to_hub: bool = False,
) -> dict[str, Any]:
    """Export a succeeded job after the fact; outcomes go to its artifacts.json and notes."""
    with job_context(job_id):
        settings = get_settings()
        try:
            return run_export(
                job_id,
                settings.db_url,
                settings.models_dir,
                formats=formats,
                gguf_quantizations=gguf_quantizations,
                push_to_hub=push_to_hub,
            )
        except MedtuneError as exc:
            return {"error": exc.as_dict()}
        finally:  # the export freed the kept base and its own model: fast builds may fit now
            send_freed(settings, why=f"a later export of job {job_id} ended")


_engine_lock = threading.Lock()


def llama_threads(settings: Settings, queues: set[str]) -> int:
    """llama.cpp's threads for a worker consuming ``queues`` (MEDTUNE_INFER_THREADS wins)."""
    threads = settings.llama_threads(inference_only=serves_only_inference(queues))
    log.info(
        "llama.cpp threads: %d (%s; queues %s)",
        threads,
        "MEDTUNE_INFER_THREADS" if settings.infer_threads else "by role",
        ",".join(sorted(queues)),
    )
    return threads


@lru_cache(maxsize=1)
def _new_engine() -> InferenceEngine:
    # Made at the first inference request, after the worker has selected its queues.
    settings = get_settings()
    return InferenceEngine(
        models_dir=settings.models_dir,
        max_batch=settings.infer_max_batch,
        batch_wait_s=settings.infer_batch_wait_ms / 1000,
        default_backend=settings.infer_backend,
        llama_threads=llama_threads(settings, consumed_queues()),
        fast=settings.infer_fast == "auto",
    )


def _engine() -> InferenceEngine:
    # One engine per process, also when a threads pool asks for it from several threads at once.
    with _engine_lock:
        return _new_engine()


@app.task(name=INFER_TASK)
def infer_task(
    job_id: str | None,
    messages: list[dict[str, str]],
    *,
    use_adapter: bool = True,
    base_model: str | None = None,
    stream_id: str | None = None,
    deltas: bool = True,
    job: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Returns the answer, or {"error": {...}} so the API can answer with the same problem.

    With ``stream_id`` the deltas (unless ``deltas`` is false), then ``done`` or ``error``, go on
    that stream, and the return value is only the answer's finish reason, usage and backend.
    ``job``: the job's fields as the API read them (``job_target``), so no job-store query
    here; without it the job is read from the store.
    options: max_new_tokens, temperature, top_p, stop, backend.
    """
    settings = get_settings()
    result = serve(
        _engine(),
        lambda: build_request(
            settings,
            job_id=job_id,
            base_model=base_model,
            messages=messages,
            use_adapter=use_adapter,
            options=options,
            job=job,
        ),
        channel=channel_for(settings) if stream_id else None,
        stream_id=stream_id,
        deltas=deltas,
    )
    if stream_id and "error" not in result:
        # The answer went out on the stream. Celery logs a task's return value, so return only
        # its shape: a patient's question's answer has no place in the worker's log.
        return {key: result.get(key) for key in ("finish_reason", "usage", "backend")}
    return result


@app.task(name=WARM_TASK)
def warm_task(
    base_model: str,
    *,
    load_in_4bit: bool = True,
    adapter_dir: str | None = None,
    adapter_name: str | None = None,
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load a job's base (and adapter) before its first question; see core/inference/warm.py."""
    try:
        return warm(
            _engine(),
            base_model=base_model,
            load_in_4bit=load_in_4bit,
            adapter_dir=adapter_dir,
            adapter_name=adapter_name,
            training=training,
        )
    except Exception as exc:  # a failed warm costs the first answer its speed, nothing more
        log.warning("warming %s failed: %s: %s", base_model, type(exc).__name__, exc)
        return {"warmed": False, "why": f"{type(exc).__name__}: {exc}"[:300]}


@app.task(name=FREED_TASK)
def memory_freed_task(
    *, job_id: str | None = None, device: str | None = None, why: str = "memory freed"
) -> dict[str, Any]:
    """A training worker freed memory (a job ended, an export did); see core/inference/warm.py."""
    try:
        return freed(_engine(), job_id=job_id, device=device, why=why)
    except Exception as exc:  # costs a fast build at most, nothing more
        log.warning("memory-freed message (%s) failed: %s: %s", why, type(exc).__name__, exc)
        return {"released": False, "queued": 0}


@worker_ready.connect
def _preload(sender: Any = None, **_: Any) -> None:
    """MEDTUNE_INFER_PRELOAD: an inference worker loads that base in the background at start."""
    settings = get_settings()
    consumed = {q.name for q in sender.task_consumer.queues} if sender else set()
    if not settings.infer_preload or INFER_QUEUE not in consumed:
        return

    def load() -> None:
        try:
            # medtune up and the compose file put a training worker on the same card.
            log.info("preload: %s", preload(_engine(), settings, shares_card_with_training=True))
        except Exception as exc:
            log.warning("preload of %s failed: %s", settings.infer_preload, exc)

    threading.Thread(target=load, name="medtune-preload", daemon=True).start()


@lru_cache(maxsize=4)
def _tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@app.task(name=PREVIEW_TASK)
def preview_task(request: dict[str, Any]) -> dict[str, Any]:
    """Render a dataset preview; returns {"error": {...}} so the API answers the same problem."""
    try:
        base_model = request["base_model"]
        path = resolve(base_model, models_dir=get_settings().models_dir)
        # A copy: the preview may set another chat template on it.
        tokenizer = copy.deepcopy(hub_call(base_model, _tokenizer, path))
        return preview_request(request, tokenizer)
    except MedtuneError as exc:
        return {"error": exc.as_dict()}
