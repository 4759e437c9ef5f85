"""/infer: quick questions to a finished job's tuned model, answered by an inference worker."""

from __future__ import annotations

import time

from fastapi import APIRouter

from api.deps import LimiterDep, PrincipalDep, QueueDep, SessionDep, SettingsDep
from api.schemas import InferRequest, InferResponse
from api.worker_calls import call_inference_worker
from core import jobs
from core.errors import JobNotReady
from core.models import JobStatus
from core.queue import INFER_TASK
from core.spec import JobSpec

router = APIRouter(tags=["inference"])


@router.post("/infer", response_model=InferResponse)
def infer(
    body: InferRequest,
    session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
    principal: PrincipalDep,
    limiter: LimiterDep,
) -> InferResponse:
    """Answer a question with the job's adapter (or its base model with use_adapter=false)."""
    job = jobs.get_job(session, body.job_id, owner=principal.job_owner)
    limiter.hit(
        "infer", principal.scope, per_minute=settings.rate_infer_per_minute, what="inferences"
    )
    if body.use_adapter and job.status != JobStatus.succeeded:
        raise JobNotReady(
            f"job {job.id} is {job.status}; only a succeeded job has a tuned model to ask "
            "(use_adapter=false asks its base model)",
            field="job_id",
        )
    if body.messages is not None:
        messages = [m.model_dump() for m in body.messages]
    else:
        system = body.system_prompt
        if system is None:
            system = JobSpec.model_validate(job.spec).dataset.system_prompt
        messages = [{"role": "user", "content": body.question or ""}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
    started = time.perf_counter()
    result = call_inference_worker(
        queue,
        INFER_TASK,
        args=[job.id, messages],
        kwargs={
            "use_adapter": body.use_adapter,
            "max_new_tokens": body.max_new_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
        },
        timeout_s=settings.infer_timeout_s,
    )
    return InferResponse(
        job_id=job.id,
        model=job.finetuned_model if body.use_adapter else job.base_model,
        adapter=body.use_adapter,
        answer=result["answer"],
        finish_reason=result["finish_reason"],
        usage=result["usage"],
        generation_seconds=result["generation_seconds"],
        tokens_per_second=result["tokens_per_second"],
        latency_ms=round((time.perf_counter() - started) * 1000, 1),
    )
