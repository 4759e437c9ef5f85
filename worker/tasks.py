"""Tasks take ids and plain values, re-read the job store, and delegate to core."""

from __future__ import annotations

import copy
import socket
from functools import lru_cache
from typing import Any

from core import jobs
from core.base_models import hub_call, resolve
from core.data.preview import PREVIEW_TASK, preview
from core.db import session_scope
from core.errors import JobNotReady, MedtuneError
from core.inference import InferenceEngine
from core.logs import install_celery_logging, job_context
from core.models import JobStatus
from core.pipeline import run_job
from core.queue import INFER_TASK, RUN_JOB_TASK
from core.settings import get_settings
from core.spec import DatasetSection
from worker.celery_app import app

# MEDTUNE_LOG_FORMAT=json: JSON lines; this module is imported before Celery sets up logging.
install_celery_logging()


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job_task(self: Any, job_id: str) -> str:
    # Every line logged while the job runs (ours, transformers', celery's) carries its id.
    with job_context(job_id):
        return run_job(job_id, get_settings(), worker=self.request.hostname or socket.gethostname())


@lru_cache(maxsize=1)
def _engine() -> InferenceEngine:
    return InferenceEngine(models_dir=get_settings().models_dir)


@app.task(name=INFER_TASK)
def infer_task(
    job_id: str,
    messages: list[dict[str, str]],
    *,
    use_adapter: bool = True,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> dict[str, Any]:
    """Returns the answer, or {"error": {...}} so the API can answer with the same problem."""
    try:
        with session_scope(get_settings().db_url) as s:
            job = jobs.get_job(s, job_id)
        if use_adapter and (job.status != JobStatus.succeeded or not job.adapter_dir):
            raise JobNotReady(f"job {job_id} is {job.status}, not succeeded", field="job_id")
        result = _engine().answer(
            base_model=job.base_model,
            messages=messages,
            adapter_dir=job.adapter_dir if use_adapter else None,
            adapter_name=job_id,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
        )
        return {**result, "loads": dict(_engine().loads)}
    except MedtuneError as exc:
        return {"error": exc.as_dict()}


@lru_cache(maxsize=4)
def _tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@app.task(name=PREVIEW_TASK)
def preview_task(request: dict[str, Any]) -> dict[str, Any]:
    """Render a dataset preview; returns {"error": {...}} so the API answers the same problem."""
    try:
        base_model = request["base_model"]
        section = DatasetSection.model_validate(request["training_dataset"])
        path = resolve(base_model, models_dir=get_settings().models_dir)
        # A copy: the preview may set another chat template on it.
        tokenizer = copy.deepcopy(hub_call(base_model, _tokenizer, path))
        return preview(
            section, tokenizer, max_seq_length=request["max_seq_length"], count=request["count"]
        )
    except MedtuneError as exc:
        return {"error": exc.as_dict()}
