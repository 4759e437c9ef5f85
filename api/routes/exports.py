"""POST /jobs/{id}/exports: export a succeeded job's model again, or in more formats, later."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from api.deps import PrincipalDep, QueueDep, SessionDep
from core.export import hub
from core.export.formats import manifest_keys
from core.export.run import adapter_folder
from core.queue import EXPORT_TASK, TRAIN_QUEUE
from core.spec import ExportFormat, GgufQuantization, JobSpec
from core.store import jobs

router = APIRouter(prefix="/jobs", tags=["exports"])


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    formats: list[ExportFormat] = Field(
        min_length=1,
        description="lora, merged_16bit, merged_4bit, gguf; each is smoke-tested after writing.",
    )
    gguf_quantizations: list[GgufQuantization] = Field(
        default_factory=lambda: ["q4_k_m"],
        min_length=1,
        description="GGUF files to write when formats has 'gguf': f16, q8_0, q4_k_m.",
    )
    push_to_hub: bool = Field(
        default=False,
        description="Push the new artifacts to <hugging_face_username>/<finetuned_model> with "
        "the worker's HF_TOKEN.",
    )


@router.post("/{job_id}/exports", status_code=202)
def create_export(
    session: SessionDep,
    principal: PrincipalDep,
    queue: QueueDep,
    job_id: str,
    request: ExportRequest,
) -> dict[str, Any]:
    """Queue an export of a succeeded job; its artifacts appear in GET /jobs/{id}/artifacts."""
    job = jobs.get_job(session, job_id, owner=principal.job_owner)
    adapter_folder(job)  # 409 job_not_ready / adapter_missing now, not later on a worker
    formats = list(dict.fromkeys(request.formats))
    quantizations = list(dict.fromkeys(request.gguf_quantizations))
    if request.push_to_hub:
        spec = JobSpec.model_validate(job.spec)
        hub.repo_id(spec.hugging_face_username, spec.model.finetuned_model)
    # The job's own queue: a worker that could hold its base model for training can merge it.
    queue.send_task(
        EXPORT_TASK,
        args=[job_id],
        kwargs={
            "formats": formats,
            "gguf_quantizations": quantizations,
            "push_to_hub": request.push_to_hub,
        },
        queue=job.queue or TRAIN_QUEUE,
    )
    return {
        "object": "export",
        "job_id": job_id,
        "status": "queued",
        "formats": formats,
        "gguf_quantizations": quantizations,
        "push_to_hub": request.push_to_hub,
        "artifacts": manifest_keys(formats, quantizations),
    }
