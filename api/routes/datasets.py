"""Datasets: a job's dataset statistics, and previews of a dataset spec rendered by a worker."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from api.deps import LimiterDep, PrincipalDep, QueueDep, SessionDep, SettingsDep
from api.schemas import DatasetPreview, DatasetPreviewRequest, JobDatasetPublic
from api.worker_calls import call_inference_worker, count_inference
from core.base_models import allowed_model_roots, check_base_model
from core.data.preference_rows import check_rows
from core.data.preview import preview_spec
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
    """Render the first examples of a dataset spec, per token marked trained or not (dpo /
    orpo: its first preference pairs as the trainer takes them)."""
    # A preview takes an inference worker's time: it counts against the inference limit.
    count_inference(limiter, principal, settings)
    request = body.model_dump(mode="json")
    # A dpo / orpo preview is refused where the job would be (a mix, raw text, budgets).
    spec = _preference_spec(request) if body.method != "sft" or body.preference else None
    check_base_model(body.base_model, roots=allowed_model_roots(settings), field="base_model")
    dataset = {"training_dataset": request["training_dataset"]}
    files.check_spec_files(session, dataset, owner=principal.job_owner)
    roots = allowed_roots(settings)
    path = resolve_local(body.training_dataset, roots=roots, uploads=settings.uploads_dir)
    if spec is not None:  # as at submit: a local file's first row must be a preference pair
        check_rows(spec, path)
    # The tokenizer lives on an inference worker: the API never imports transformers.
    result = call_inference_worker(
        queue,
        PREVIEW_TASK,
        args=[request],
        timeout_s=settings.infer_timeout_s,
    )
    return DatasetPreview(base_model=body.base_model, **result)


# The job spec's names for what a preview request names at its top level.
_RENAMED = (
    ("training_config.preference", "preference"),
    ("training_config.method", "method"),
    ("model_config.max_seq_length", "max_seq_length"),
)


def _preview_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    if loc[:2] == ("training_config", "preference") or loc[:1] == ("model_config",):
        return ("body", *loc[1:])
    if loc[:1] == ("training_config",):  # a setting the method cannot use: the method's
        return ("body", "method")
    return ("body", *loc)


def _preference_spec(request: dict[str, Any]) -> JobSpec:
    """The dpo / orpo job the preview stands for; where POST /jobs would refuse it, the same
    422, named by the preview's own fields."""
    try:
        return preview_spec(request)
    except ValidationError as exc:
        errors = []
        for error in exc.errors(include_url=False, include_context=False):
            message = error["msg"]
            for old, new in _RENAMED:
                message = message.replace(old, new)
            errors.append({**error, "loc": _preview_loc(error["loc"]), "msg": message})
        raise RequestValidationError(errors) from None
