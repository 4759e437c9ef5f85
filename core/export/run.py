"""Exports of a job: at the end of training, or later (``POST /jobs/{id}/exports``) on a worker.

A later export loads the base model and the job's saved adapter (transformers + peft), writes the
requested formats with ``core.export.formats`` into the job's artifacts folder, updates only their
entries of ``artifacts.json`` (marked ``running`` meanwhile), and pushes to the Hub if asked.
Imports nothing heavy at module level: the API uses the checks and the task name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from core.errors import ConflictError, ExportError, JobNotReady, MedtuneError
from core.export.formats import export_all, failed_entry, manifest_keys, update_manifest
from core.spec import JobSpec
from core.store.models import Job, JobStatus

log = logging.getLogger(__name__)


def adapter_folder(job: Job) -> Path:
    """The succeeded job's adapter folder, or a 409 saying why there is none."""
    if job.status != JobStatus.succeeded:
        raise JobNotReady(
            f"job {job.id} is {job.status}; exports need a succeeded job", field="job_id"
        )
    folder = Path(job.adapter_dir) if job.adapter_dir else None
    if folder is None or not (folder / "adapter_config.json").is_file():
        raise ConflictError(
            f"job {job.id} has no saved adapter on the server (adapter/adapter_config.json is "
            "missing); train the job again",
            field="job_id",
            code="adapter_missing",
        )
    return folder


def _load_finished(base_path: str, adapter_dir: Path) -> Any:
    """Base + the saved adapter, as the training engines hand them over (a ``Loaded``)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.export.formats import load_kwargs
    from core.training.engines import Loaded, loaded_name

    base = AutoModelForCausalLM.from_pretrained(base_path, **load_kwargs())
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    except Exception as exc:
        raise ExportError(
            f"the job's adapter folder cannot be loaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); train the job again",
            field="job_id",
            code="adapter_invalid",
        ) from exc
    return Loaded(model, tokenizer, loaded_name("transformers"))


def push(job_dir: Path, spec: JobSpec, keys: list[str]) -> dict[str, Any]:
    """Push the ok artifacts among ``keys``; the outcome goes into the manifest's ``hub``."""
    from core.export import hub
    from core.export.formats import read_manifest

    try:
        repo = hub.repo_id(spec.hugging_face_username, spec.model.finetuned_model)
        files = hub.pushable_files(job_dir, read_manifest(job_dir), keys)
        entry = {"status": "ok", **hub.push(job_dir, files, repo=repo)}
    except MedtuneError as exc:
        entry = {"status": "failed", "error": {"code": exc.code, "message": exc.detail}}
    return update_manifest(job_dir, {"hub": entry})


def notes(manifest: dict[str, Any], keys: list[str]) -> list[str]:
    """One line per artifact (and the push) for the job's notes."""
    lines = []
    for key in [*keys, "hub"]:
        entry = manifest.get(key)
        if entry is None:
            continue
        if entry["status"] != "ok":
            error = entry["error"]
            lines.append(f"export {key} failed ({error['code']}): {error['message']}")
        elif key == "hub":
            lines.append(f"pushed {len(entry['files'])} files to the Hub: {entry['repo_id']}")
        else:
            stops = sum(a["stopped"] for a in entry["smoke_test"])
            lines.append(
                f"export {key}: ok, {stops}/{len(entry['smoke_test'])} smoke answers stopped "
                "at the end-of-turn token"
            )
    return lines


def export_for_spec(
    loaded: Any, spec: JobSpec, *, job_dir: Path, adapter_dir: Path, base_path: str
) -> list[str]:
    """The export stage of a job that just trained: the spec's formats (and push); its notes."""
    section = spec.export
    manifest = export_all(
        loaded,
        job_dir=job_dir,
        adapter_dir=adapter_dir,
        base_path=base_path,
        formats=list(section.formats),
        gguf_quantizations=list(section.gguf_quantizations),
        name=spec.model.finetuned_model,
        system_prompt=spec.dataset.system_prompt,
    )
    keys = manifest_keys(list(section.formats), list(section.gguf_quantizations))
    if section.push_to_hub:
        manifest = push(job_dir, spec, keys)
    return notes(manifest, keys)


def run_export(
    job_id: str,
    db_url: str,
    models_dir: Path,
    *,
    formats: list[str],
    gguf_quantizations: list[str],
    push_to_hub: bool = False,
) -> dict[str, Any]:
    """A later export of a succeeded job, run by a worker; returns the updated manifest."""
    from core.base_models import resolve
    from core.store import jobs
    from core.store.db import session_scope
    from core.training import base_cache

    with session_scope(db_url) as s:
        job = jobs.get_job(s, job_id)
        adapter_dir = adapter_folder(job)
        spec = JobSpec.model_validate(job.spec)
        job_dir = Path(job.artifacts_dir or adapter_dir.parent)
    keys = manifest_keys(formats, gguf_quantizations)
    update_manifest(job_dir, {key: {"status": "running"} for key in keys})
    try:
        base_path = resolve(spec.model.base_model, models_dir=models_dir)
        # A training worker runs later exports: the base its last job kept loaded gives way to
        # the export's own (a bf16 base on the card beside it would not fit where jobs do).
        base_cache.release("a later export loads its own model")
        loaded = _load_finished(base_path, adapter_dir)
    except Exception as exc:
        manifest = update_manifest(job_dir, {k: failed_entry(k, exc) for k in keys})
    else:
        try:
            manifest = export_all(
                loaded,
                job_dir=job_dir,
                adapter_dir=adapter_dir,
                base_path=base_path,
                formats=formats,
                gguf_quantizations=gguf_quantizations,
                name=spec.model.finetuned_model,
                system_prompt=spec.dataset.system_prompt,
            )
            if push_to_hub:
                manifest = push(job_dir, spec, keys)
        finally:  # failed or not, its memory goes back to the card before "memory freed" is sent
            del loaded
            base_cache.free_memory()
    with session_scope(db_url) as s:
        for line in notes(manifest, keys):
            jobs.add_note(s, job_id, line)
    log.info("job %s exported %s", job_id, ", ".join(keys))
    return manifest
