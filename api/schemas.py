"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_validator

from core.models import Job, MetricRow
from core.spec import DatasetSection


class _Out(BaseModel):
    @field_serializer("*", when_used="json", check_fields=False)
    def _utc(self, value: Any) -> Any:
        # SQLite hands back naive datetimes; every stamp we store is UTC.
        if isinstance(value, datetime) and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class JobPublic(_Out):
    id: str
    object: Literal["job"] = "job"
    status: str = Field(description="queued, running, succeeded, failed or cancelled")
    stage: str | None = Field(description="preparing_data, training or exporting while running")
    base_model: str
    finetuned_model: str
    engine: str | None
    queue: str | None = Field(description="The worker queue the job was routed to.")
    estimated_gpu_memory_gib: float | None = Field(
        description="Peak GPU memory estimated from the spec (null: model shape unknown)."
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime | None
    steps_done: int
    steps_total: int | None
    cancel_requested: bool
    error: dict[str, str | None] | None
    artifacts: dict[str, str | None]
    dataset_stats: dict[str, Any] | None
    notes: list[str]
    spec: dict[str, Any]

    @classmethod
    def of(cls, job: Job) -> JobPublic:
        return cls(
            id=job.id,
            status=job.status,
            stage=job.stage,
            base_model=job.base_model,
            finetuned_model=job.finetuned_model,
            engine=job.engine,
            queue=job.queue,
            estimated_gpu_memory_gib=job.estimated_gpu_memory_gib,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            updated_at=job.updated_at,
            steps_done=job.steps_done,
            steps_total=job.steps_total,
            cancel_requested=job.cancel_requested,
            error={"code": job.error_code, "message": job.error_message}
            if job.error_code
            else None,
            artifacts={"dir": job.artifacts_dir, "adapter": job.adapter_dir},
            dataset_stats=job.dataset_stats,
            notes=job.notes,
            spec=job.spec,
        )


class JobsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic]
    has_more: bool
    next_cursor: str | None


class MetricPublic(_Out):
    model_config = ConfigDict(from_attributes=True)

    step: int
    loss: float | None
    learning_rate: float | None
    grad_norm: float | None
    epoch: float | None
    tokens_per_second: float | None
    samples_per_second: float | None
    memory_mb: float | None
    peak_memory_mb: float | None
    created_at: datetime

    @classmethod
    def of(cls, row: MetricRow) -> MetricPublic:
        return cls.model_validate(row)


class MetricsPage(BaseModel):
    object: Literal["list"] = "list"
    job_id: str
    status: str
    data: list[MetricPublic]
    has_more: bool
    last_step: int | None = Field(description="Pass as after_step to get the next rows.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1, max_length=20_000)


class InferRequest(BaseModel):
    """Ask a job's tuned model (or, with use_adapter false, its base model) a question."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(min_length=1, max_length=40)
    question: str | None = Field(default=None, min_length=1, max_length=20_000)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=64)
    system_prompt: str | None = Field(
        default=None,
        max_length=4000,
        description="Defaults to the job's training system prompt.",
    )
    use_adapter: bool = Field(default=True, description="false answers with the base model.")
    max_new_tokens: int = Field(default=256, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_prompt(self) -> InferRequest:
        if (self.question is None) == (self.messages is None):
            raise ValueError("give exactly one of 'question' or 'messages'")
        if self.messages is not None and self.messages[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return self


class InferResponse(BaseModel):
    object: Literal["inference"] = "inference"
    job_id: str
    model: str
    adapter: bool
    answer: str
    finish_reason: Literal["stop", "length"]
    usage: dict[str, int]
    generation_seconds: float
    tokens_per_second: float | None
    latency_ms: float


class CheckpointPublic(_Out):
    step: int
    created_at: datetime
    loss: float | None = Field(description="Training loss last logged before this checkpoint.")


class CheckpointsPage(BaseModel):
    object: Literal["list"] = "list"
    job_id: str
    data: list[CheckpointPublic]


class JobDatasetPublic(BaseModel):
    object: Literal["job_dataset"] = "job_dataset"
    job_id: str
    status: str
    dataset: dict[str, Any] = Field(description="The job's training_dataset section.")
    stats: dict[str, Any] = Field(
        description="Counts by source, dropped rows by reason, token length percentiles "
        "(p50/p90/p99/max, before truncation), trained-token share, truncation rate."
    )


class DatasetPreviewRequest(BaseModel):
    """Render the first examples of a dataset spec with a model's tokenizer, without training."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(default="smollm2-135m-instruct", min_length=1, max_length=300)
    max_seq_length: int = Field(default=2048, ge=16, le=131072)
    training_dataset: DatasetSection = Field(default_factory=DatasetSection)
    count: int = Field(default=3, ge=1, le=50, description="Examples to render.")


class PreviewToken(BaseModel):
    id: int
    piece: str
    trained: bool


class PreviewExample(BaseModel):
    index: int
    meta: dict[str, Any]
    text: str
    length: int = Field(description="Tokens before truncation.")
    truncated: bool
    trained_tokens: int
    tokens: list[PreviewToken]


class GateProblem(BaseModel):
    code: str
    detail: str
    example_index: int | None
    field: str


class DatasetPreview(BaseModel):
    object: Literal["dataset_preview"] = "dataset_preview"
    base_model: str
    format: str
    layout: str
    chat_template: str
    end_of_turn_token: str | None
    dropped: dict[str, int]
    examples: list[PreviewExample]
    problems: list[GateProblem] = Field(description="What the gate would fail on, if anything.")
