"""/infer: quick questions to a finished job's tuned model, answered by an inference worker."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import Field

from api.deps import LimiterDep, PrincipalDep, QueueDep, SessionDep, SettingsDep
from api.schemas import InferRequest, InferResponse
from api.worker_calls import (
    ask_inference_worker,
    count_inference,
    decoding_options,
    relay_sse,
    stream_inference_worker,
)
from core.errors import JobNotReady, MedtuneError
from core.inference.remote import job_target
from core.spec import JobSpec
from core.store import jobs
from core.store.models import JobStatus

router = APIRouter(tags=["inference"])

Backend = Literal["auto", "transformers", "llama_cpp"]


class InferAsk(InferRequest):
    """InferRequest plus streaming, stop strings and the backend."""

    stream: bool = Field(
        default=False,
        description="Answer as Server-Sent Events: 'delta' events ({text}), then 'done' with "
        "usage and finish_reason (or 'error').",
    )
    stop: list[str] | None = Field(
        default=None,
        max_length=4,
        description="Up to 4 strings that end the answer (not included in it).",
    )
    backend: Backend = Field(
        default="auto",
        description="auto: llama.cpp on a CPU worker when the model has a q4_k_m GGUF, else "
        "transformers; or force one.",
    )


class InferAnswer(InferResponse):
    backend: str = Field(description="transformers, llama_cpp or cuda_static")
    time_to_first_token_s: float | None
    batch_size: int = Field(description="Requests answered by the same generate call.")


def messages_for(body: InferRequest, spec: JobSpec) -> list[dict[str, str]]:
    """The chat to answer. Without a system turn of its own it gets the job's training system
    prompt: the adapter learned under it, and without it a template may insert its own (SmolLM2's
    "You are a helpful AI assistant named SmolLM"), a prompt the adapter never saw."""
    system = body.system_prompt
    if system is None:
        system = spec.dataset.system_prompt
    if body.messages is not None:
        messages = [m.model_dump() for m in body.messages]
    else:
        messages = [{"role": "user", "content": body.question or ""}]
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@router.post(
    "/infer",
    response_model=InferAnswer,
    responses={200: {"content": {"text/event-stream": {}}}},
)
def infer(
    body: InferAsk,
    session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
    principal: PrincipalDep,
    limiter: LimiterDep,
) -> Any:
    """Answer with the job's adapter (use_adapter=false: its base model); stream=true: SSE."""
    job = jobs.get_job(session, body.job_id, owner=principal.job_owner)
    count_inference(limiter, principal, settings)
    if body.use_adapter and job.status != JobStatus.succeeded:
        raise JobNotReady(
            f"job {job.id} is {job.status}; only a succeeded job has a tuned model to ask "
            "(use_adapter=false asks its base model)",
            field="job_id",
        )
    spec = JobSpec.model_validate(job.spec)
    kwargs: dict[str, Any] = {
        "job": job_target(job, spec),  # the worker needs no job-store query of its own
        "use_adapter": body.use_adapter,
        **decoding_options(
            max_new_tokens=body.max_new_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            repetition_penalty=body.repetition_penalty,
            stop=body.stop,
        ),
    }
    if body.backend != "auto":
        kwargs["backend"] = body.backend
    args = [job.id, messages_for(body, spec)]
    model = job.finetuned_model if body.use_adapter else job.base_model
    started = time.perf_counter()
    try:
        if body.stream:
            events = stream_inference_worker(queue, settings, args=args, kwargs=kwargs)
        else:
            result = ask_inference_worker(queue, settings, args=args, kwargs=kwargs)
    except MedtuneError as exc:
        # The worker names the prompt "messages"; this client may have sent a question.
        if exc.field == "messages" and body.question is not None:
            exc.field = "question"
        raise
    if body.stream:
        return relay_sse(
            _relay(iter(events), job_id=job.id, model=model, adapter=body.use_adapter),
            on_disconnect=events.cancel,
        )
    return InferAnswer(
        job_id=job.id,
        model=model,
        adapter=body.use_adapter,
        answer=result["answer"],
        finish_reason=result["finish_reason"],
        usage=result["usage"],
        generation_seconds=result["generation_seconds"],
        tokens_per_second=result["tokens_per_second"],
        latency_ms=round((time.perf_counter() - started) * 1000, 1),
        backend=result.get("backend", "transformers"),
        time_to_first_token_s=result.get("time_to_first_token_s"),
        batch_size=result.get("batch_size", 1),
    )


def _relay(
    events: Iterator[dict[str, Any]], *, job_id: str, model: str, adapter: bool
) -> Iterator[str]:
    try:
        yield from _relay_events(events, job_id=job_id, model=model, adapter=adapter)
    except MedtuneError as exc:  # the worker went quiet mid-answer
        yield sse("error", exc.as_dict())


def _relay_events(
    events: Iterator[dict[str, Any]], *, job_id: str, model: str, adapter: bool
) -> Iterator[str]:
    for event in events:
        if event["type"] == "delta":
            yield sse("delta", {"text": event["text"]})
        elif event["type"] == "done":
            result = event["result"]
            yield sse(
                "done",
                {
                    "job_id": job_id,
                    "model": model,
                    "adapter": adapter,
                    "answer": result["answer"],
                    "finish_reason": result["finish_reason"],
                    "usage": result["usage"],
                    "backend": result.get("backend"),
                    "time_to_first_token_s": result.get("time_to_first_token_s"),
                    "tokens_per_second": result.get("tokens_per_second"),
                    "batch_size": result.get("batch_size", 1),
                },
            )
        else:
            yield sse("error", event["error"])
