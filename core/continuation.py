"""Continuing from a finished job: ``model_config.init_adapter`` names a job whose adapter the
new job starts from.

Checked at submit (the caller owns it, it succeeded with an adapter, on the same base, with a
LoRA shape the new spec repeats) and looked up again by the worker, which loads the weights onto
the base as trainable (core.training.engines). A job whose adapter a queued or running job
starts from cannot be deleted meanwhile (core.store.purge).
"""

from __future__ import annotations

import json
from pathlib import Path

from sqlmodel import Session, col, select

from core.errors import JobNotFound, SpecError
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.models import Job, JobStatus

FIELD = "model_config.init_adapter"
ADAPTER_CONFIG = "adapter_config.json"
# The LoRA settings the loaded adapter fixes; the new spec must say the same.
SHAPE = ("r", "lora_alpha", "bias", "use_rslora", "use_dora")


def _source(session: Session, job_id: str, owner: str | None) -> Job:
    try:
        return jobs.get_job(session, job_id, owner=owner)
    except JobNotFound as exc:
        raise SpecError(
            f"no job with id {job_id!r} to continue from; give the id of one of your succeeded "
            "jobs (GET /jobs?status=succeeded)",
            field=FIELD,
            code="init_adapter_not_found",
        ) from exc


def check_init_adapter(session: Session, spec: JobSpec, *, owner: str | None) -> None:
    """422 unless ``init_adapter`` names the caller's succeeded job with an adapter, on the same
    base model and LoRA shape."""
    job_id = spec.model.init_adapter
    if job_id is None:
        return
    source = _source(session, job_id, owner)
    if source.status != JobStatus.succeeded:
        raise SpecError(
            f"job {job_id} is {source.status}; only a succeeded job's adapter can be continued",
            field=FIELD,
            code="init_adapter_not_ready",
        )
    if not source.adapter_dir or not (Path(source.adapter_dir) / ADAPTER_CONFIG).is_file():
        raise SpecError(
            f"job {job_id} has no adapter on the server (deleted, or never saved); continue "
            "from another job",
            field=FIELD,
            code="init_adapter_missing",
        )
    if source.base_model != spec.model.base_model:
        raise SpecError(
            f"job {job_id} tuned {source.base_model!r}, not {spec.model.base_model!r}; an "
            "adapter only fits its own base: set model_config.base_model to "
            f"{source.base_model!r}",
            field=FIELD,
            code="init_adapter_base_mismatch",
        )
    theirs = source.spec.get("lora_config", {})
    ours = spec.lora.model_dump()
    differ = [k for k in SHAPE if theirs.get(k) != ours[k]]
    if set(theirs.get("target_modules", [])) != set(ours["target_modules"]):
        differ.append("target_modules")
    # Specs stored before modules_to_save existed have none.
    if set(theirs.get("modules_to_save") or []) != set(ours["modules_to_save"]):
        differ.append("modules_to_save")
    if differ:
        shown = ", ".join(f"{k} {theirs.get(k)!r}" for k in differ)
        raise SpecError(
            f"job {job_id}'s adapter has {shown}; set lora_config to the same, since the "
            "adapter's weights fix its shape",
            field="lora_config." + differ[0],
            code="init_adapter_lora_mismatch",
        )


def adapter_path(url: str, spec: JobSpec) -> str | None:
    """The worker's look-up: the folder of the adapter to start from, or None for a fresh one."""
    job_id = spec.model.init_adapter
    if job_id is None:
        return None
    with session_scope(url) as s:
        source = s.get(Job, job_id)
    folder = Path(source.adapter_dir) if source and source.adapter_dir else None
    if folder is None or not (folder / ADAPTER_CONFIG).is_file():
        raise SpecError(
            f"the adapter of job {job_id} is gone from the server (the job was deleted); "
            "submit again from another job, or without init_adapter",
            field=FIELD,
            code="init_adapter_missing",
        )
    json.loads((folder / ADAPTER_CONFIG).read_text())  # a torn file fails here, not in peft
    return str(folder)


def continuing_jobs(session: Session, job_id: str) -> list[str]:
    """Queued or running jobs that start from ``job_id``'s adapter."""
    active = (JobStatus.queued.value, JobStatus.running.value)
    rows = session.exec(select(Job.id, Job.spec).where(col(Job.status).in_(active))).all()
    return [i for i, spec in rows if (spec.get("model_config") or {}).get("init_adapter") == job_id]
