"""OpenAI-compatible chat: POST /v1/chat/completions and GET /v1/models.

``model`` is a job id, a succeeded job's finetuned_model, or a base model. Answers are
``chat.completion`` objects, or with ``stream`` ``chat.completion.chunk`` Server-Sent Events
ending with ``data: [DONE]``. Errors are this API's problem+json (``field`` names the OpenAI
request field), as on the rest of /v1.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.deps import LimiterDep, PrincipalDep, QueueDep, SessionDep, SettingsDep
from api.worker_calls import (
    ask_inference_worker,
    count_inference,
    decoding_options,
    relay_sse,
    stream_inference_worker,
)
from core.errors import MedtuneError
from core.inference.catalog import list_models, resolve_model
from core.inference.remote import job_target

router = APIRouter(prefix="/v1", tags=["openai"])


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="Text, or a list of text parts.")
    name: str | None = None

    def plain(self) -> dict[str, str]:
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        # "developer" is OpenAI's newer name for the system role.
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion body (the fields medtune honours; others are refused)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=300)
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=64)
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # Not OpenAI's: Together's and vLLM's extension, for the same knob as /infer's.
    repetition_penalty: float = Field(default=1.0, ge=1.0, le=2.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = Field(default=1, description="Only one choice is generated.")
    seed: int | None = None
    user: str | None = Field(default=None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @field_validator("messages")
    @classmethod
    def _last_user(cls, value: list[ChatMessageIn]) -> list[ChatMessageIn]:
        if value[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return value

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def _chunk(base: dict[str, Any], delta: dict[str, Any], finish: str | None) -> str:
    body = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


# The worker names the fields of /infer; here the client sent them under OpenAI's names.
_OPENAI_FIELDS = {"job_id": "model", "max_new_tokens": "max_tokens"}


def _as_model_field(exc: MedtuneError) -> MedtuneError:
    exc.field = _OPENAI_FIELDS.get(exc.field or "", exc.field)
    return exc


@router.post(
    "/chat/completions",
    responses={200: {"content": {"text/event-stream": {}}}},
)
def create_chat_completion(
    body: ChatCompletionRequest,
    session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
    principal: PrincipalDep,
    limiter: LimiterDep,
) -> Any:
    """A chat completion (or its chunks with stream=true) from a tuned job or a base model."""
    target = resolve_model(session, body.model, owner=principal.job_owner)
    count_inference(limiter, principal, settings)
    kwargs: dict[str, Any] = {
        "use_adapter": target.job is not None,
        **decoding_options(
            max_new_tokens=body.max_completion_tokens or body.max_tokens or 256,
            temperature=body.temperature,
            top_p=body.top_p,
            repetition_penalty=body.repetition_penalty,
            stop=body.stops(),
        ),
    }
    if target.job is None:
        kwargs["base_model"] = target.base_model
    else:
        kwargs["job"] = job_target(target.job)  # the worker needs no job-store query of its own
    args = [target.job.id if target.job else None, [m.plain() for m in body.messages]]
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": body.model,
    }
    try:
        if body.stream:
            events = stream_inference_worker(queue, settings, args=args, kwargs=kwargs)
            usage = body.stream_options is not None and body.stream_options.include_usage
            return relay_sse(
                _chunks(
                    iter(events), {**base, "object": "chat.completion.chunk"}, include_usage=usage
                ),
                on_disconnect=events.cancel,
            )
        result = ask_inference_worker(queue, settings, args=args, kwargs=kwargs)
    except MedtuneError as exc:
        raise _as_model_field(exc) from None
    return {
        **base,
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result["answer"]},
                "finish_reason": result["finish_reason"],
                "logprobs": None,
            }
        ],
        "usage": result["usage"],
        "system_fingerprint": f"medtune-{result.get('backend', 'transformers')}",
    }


def _chunks(
    events: Iterator[dict[str, Any]], base: dict[str, Any], *, include_usage: bool
) -> Iterator[str]:
    yield _chunk(base, {"role": "assistant", "content": ""}, None)
    try:
        for event in events:
            if event["type"] == "delta":
                yield _chunk(base, {"content": event["text"]}, None)
            elif event["type"] == "done":
                result = event["result"]
                yield _chunk(base, {}, result["finish_reason"])
                if include_usage:
                    usage = {**base, "choices": [], "usage": result["usage"]}
                    yield f"data: {json.dumps(usage)}\n\n"
            else:
                yield f"data: {json.dumps({'error': event['error']})}\n\n"
    except MedtuneError as exc:  # the worker went quiet mid-answer
        yield f"data: {json.dumps({'error': _as_model_field(exc).as_dict()})}\n\n"
    yield "data: [DONE]\n\n"


@router.get("/models")
def read_models(session: SessionDep, principal: PrincipalDep) -> dict[str, Any]:
    """Models the caller can ask: base models and its succeeded jobs."""
    return {"object": "list", "data": list_models(session, owner=principal.job_owner)}
