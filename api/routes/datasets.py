"""Datasets: a job's dataset statistics, and previews of a dataset spec rendered by a worker."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import LimiterDep, PrincipalDep, QueueDep, SessionDep, SettingsDep
from api.schemas import DatasetPreview, DatasetPreviewRequest, JobDatasetPublic
from api.worker_calls import call_inference_worker
from core.base_models import allowed_model_roots, check_base_model
from core.data.sources import allowed_roots, resolve_local
from core.errors import JobNotReady
from core.queue import PREVIEW_TASK
from core.spec import JobSpec
from core.store import files, jobs

router = APIRouter(tags=["datasets"])


@router.get("/jobs/{job_id}/dataset", response_model=JobDatasetPublic)
def read_job_dataset(session: SessionDep, principal: PrincipalDep, job_id: str) -> JobDatasetPublic:
    """The statistics of a job's prepared dataset (stored before training starts)."""
    job = jobs.get_job(session, job_id, owner=principal.job_owner)
    if not job.dataset_stats:
        raise JobNotReady(
            f"job {job.id} is {job.status} and has no dataset statistics yet; they are stored "
            "once its data is prepared",
            field="job_id",
            code="dataset_not_ready",
        )
    return JobDatasetPublic(
        job_id=job.id,
        status=job.status,
        dataset=JobSpec.model_validate(job.spec).dataset.model_dump(mode="json"),
        stats=job.dataset_stats,
    )


@router.post("/datasets/preview", response_model=DatasetPreview)
def preview_dataset(
    body: DatasetPreviewRequest,
    session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
    principal: PrincipalDep,
    limiter: LimiterDep,
) -> DatasetPreview:
    """Render the first examples of a dataset spec, per token marked trained or not."""
    # A preview takes an inference worker's time: it counts against the inference limit.
    limiter.hit(
        "infer", principal.scope, per_minute=settings.rate_infer_per_minute, what="inferences"
    )
    check_base_model(body.base_model, roots=allowed_model_roots(settings), field="base_model")
    dataset = {"training_dataset": body.training_dataset.model_dump(mode="json")}
    files.check_spec_files(session, dataset, owner=principal.job_owner)
    roots = allowed_roots(settings)
    resolve_local(body.training_dataset, roots=roots, uploads=settings.uploads_dir)
    # The tokenizer lives on an inference worker: the API never imports transformers.
    result = call_inference_worker(
        queue,
        PREVIEW_TASK,
        args=[body.model_dump(mode="json")],
        timeout_s=settings.infer_timeout_s,
    )
    return DatasetPreview(base_model=body.base_model, **result)
