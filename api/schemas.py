"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

from api.openai_method import FineTuningHyperparameters, FineTuningMethod
from core.spec import DEFAULT_REPETITION_PENALTY, DatasetSection, check_model_name
from core.spec.job import public_spec
from core.spec.preference import Method, PreferenceSection
from core.store.models import Job, MetricRow


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
    worker: str | None = Field(
        default=None, description="The worker process that claimed the job (its Celery node name)."
    )
    estimated_gpu_memory_gib: float | None = Field(
        description="Peak GPU memory estimated from the spec (null: model shape unknown)."
    )
    created_at: datetime
    started_at: datetime | None = Field(
        description="When the first attempt started (a resumed job keeps it)."
    )
    finished_at: datetime | None
    updated_at: datetime | None
    attempts: int = Field(default=0, description="How many times a worker started the job.")
    attempt_log: list[dict[str, Any]] = Field(
        default_factory=list,
        description="One entry per attempt: attempt, worker, started_at, and once it is over "
        "ended_at and outcome (worker lost, worker restarted, succeeded, failed, cancelled).",
    )
    steps_done: int
    steps_total: int | None
    stop_reason: str | None = Field(
        default=None,
        description="Why training ended: max_steps, epochs, early_stopping or cancelled.",
    )
    kept_step: int | None = Field(
        default=None,
        description="The step whose weights the adapter holds (training_config.keep).",
    )
    cancel_requested: bool
    error: dict[str, str | None] | None
    artifacts: dict[str, str | None]
    dataset_stats: dict[str, Any] | None
    stage_seconds: dict[str, float] | None = Field(
        default=None,
        description="Wall seconds each stage of the job's last attempt took, in order: "
        "preparing_data, loading_model, training, evaluating (when enabled), exporting "
        "(adapter, export formats and their smoke answers). A running job shows the stages "
        "it has finished.",
    )
    notes: list[str]
    tracking: dict[str, Any] | None = Field(
        default=None,
        description="Where the job's experiment-tracker runs are (training_config.report_to): "
        "mlflow {tracking_uri, experiment_id, run_id}, wandb {project, entity, run_id, url, "
        "dir, mode}. null: TensorBoard only.",
    )
    webhook: dict[str, Any] | None = Field(
        default=None,
        description="With a webhook in the spec: state (pending, delivered, failed), event_id, "
        "type, attempts, last_status, last_error, first/last_attempt_at, delivered_at.",
    )
    spec: dict[str, Any] = Field(description="The job spec; a webhook secret shows masked.")

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
            worker=job.worker,
            estimated_gpu_memory_gib=job.estimated_gpu_memory_gib,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            updated_at=job.updated_at,
            attempts=job.attempts,
            attempt_log=job.attempt_log or [],
            steps_done=job.steps_done,
            steps_total=job.steps_total,
            stop_reason=job.stop_reason,
            kept_step=job.kept_step,
            cancel_requested=job.cancel_requested,
            error={"code": job.error_code, "message": job.error_message}
            if job.error_code
            else None,
            artifacts={"dir": job.artifacts_dir, "adapter": job.adapter_dir},
            dataset_stats=job.dataset_stats,
            stage_seconds=job.stage_seconds,
            notes=job.notes,
            tracking=job.tracking,
            webhook={"state": job.webhook_state, **(job.webhook_delivery or {})}
            if job.webhook_state
            else None,
            spec=public_spec(job.spec),
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
    tokens_per_second: float | None = Field(
        description="Real (non-padding) tokens trained per second."
    )
    samples_per_second: float | None
    memory_mb: float | None = Field(
        description="Allocated GPU memory (MiB) on a CUDA worker; resident set on a CPU one."
    )
    reserved_memory_mb: float | None = Field(
        default=None,
        description="GPU memory held by the CUDA caching allocator (MiB); null on a CPU worker.",
    )
    peak_memory_mb: float | None = Field(
        description="Peak allocated GPU memory (MiB); the resident set's high-water mark on a CPU."
    )
    eta_seconds: float | None = Field(
        default=None, description="Steps remaining x the recent training step time."
    )
    eval_loss: float | None = Field(
        default=None,
        description="Loss on the held-out split at this step (jobs with a validation_dataset "
        "or a validation_share).",
    )
    # dpo / orpo jobs: mean rewards of the step's pairs (dpo: beta x log-ratio to the
    # reference; orpo: beta x mean log-probability), margin (chosen minus rejected), accuracy
    # (share of pairs whose chosen answer wins), and margin and accuracy on held-out pairs.
    rewards_chosen: float | None = None
    rewards_rejected: float | None = None
    rewards_margin: float | None = None
    rewards_accuracy: float | None = None
    eval_rewards_margin: float | None = None
    eval_rewards_accuracy: float | None = None
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
    # 1.1, as the held-out evaluation: greedy answers of a small tuned model loop without it
    # (BENCHMARKS.md, issue #20); Ollama's default is the same.
    repetition_penalty: float = Field(
        default=DEFAULT_REPETITION_PENALTY,
        ge=1.0,
        le=2.0,
        description="Above 1 discourages repeating tokens the answer already holds (not the "
        "question's, nor the end of turn; 1.0: off, plain greedy). /v1/chat/completions keeps "
        "OpenAI's default, off.",
    )

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
        "(p50/p90/p99/max, before truncation), trained-token share, truncation rate; "
        "'validation': where the validation split came from (kind validation_dataset, with "
        "that set's own statistics, or validation_share), null without one."
    )


class DatasetPreviewRequest(BaseModel):
    """Render the first examples of a dataset spec with a model's tokenizer, without training."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(default="smollm2-135m-instruct", min_length=1, max_length=300)
    max_seq_length: int = Field(default=2048, ge=16, le=131072)
    training_dataset: DatasetSection = Field(default_factory=DatasetSection)
    count: int = Field(default=3, ge=1, le=50, description="Examples to render.")
    method: Method = Field(
        default="sft",
        description="The training_config.method the data is for. sft: each example's tokens, "
        "flagged trained or not. dpo / orpo: each preference pair as those trainers take it "
        "(the prompt, the chosen and the rejected answer, cut to the budgets in preference).",
    )
    preference: PreferenceSection | None = Field(
        default=None,
        description="A dpo / orpo preview's training_config.preference (its max_prompt_length "
        "and max_completion_length cut the pairs); null: the defaults from max_seq_length.",
    )

    @field_validator("base_model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        return check_model_name(value)


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


class PreviewPair(BaseModel):
    """A preference pair as the dpo / orpo trainer takes it: each text is the tokens kept."""

    index: int
    meta: dict[str, Any]
    prompt: str = Field(description="The prompt through the chat template (its end kept).")
    chosen: str = Field(description="The chosen answer with its end of turn (its start kept).")
    rejected: str = Field(description="The rejected answer, likewise.")
    prompt_tokens: int = Field(description="Tokens the trainer gets, after the cut.")
    chosen_tokens: int
    rejected_tokens: int
    prompt_length: int = Field(description="Tokens before the cut.")
    chosen_length: int
    rejected_length: int
    truncated: bool
    cut_by: str | None = Field(description="The budget that cut the pair, if one did.")


class DatasetPreview(BaseModel):
    object: Literal["dataset_preview"] = "dataset_preview"
    base_model: str
    method: Method = "sft"
    format: str
    layout: str
    chat_template: str
    end_of_turn_token: str | None
    dropped: dict[str, int]
    examples: list[PreviewExample] = Field(description="sft: the rendered examples.")
    pairs: list[PreviewPair] = Field(
        default_factory=list, description="dpo / orpo: the preference pairs (examples is empty)."
    )
    max_prompt_length: int | None = Field(
        default=None, description="dpo / orpo: the prompt budget the pairs were cut to."
    )
    max_completion_length: int | None = Field(
        default=None, description="dpo / orpo: each answer's budget."
    )
    problems: list[GateProblem] = Field(description="What the gate would fail on, if anything.")


# --- OpenAI-compatible fine-tuning (/v1/fine_tuning) ----------------------------------------------


class FineTuningJobCreate(BaseModel):
    """OpenAI's create-fine-tuning-job body, plus ``medtune`` for any medtune spec section."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=300, description="The base model.")
    training_file: str = Field(
        min_length=1,
        max_length=1000,
        description="A dataset as medtune's training_dataset.name takes it: a file id from "
        "POST /v1/files (or /files), a local file or folder, 'sample:medical_qa', or a Hub "
        "dataset id.",
    )
    validation_file: str | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="A separate validation set (medtune's validation_dataset.name): a file id "
        "from POST /v1/files (or /files) that the caller owns, or any other name training_file "
        "takes. Prepared like the training file; eval loss and the evaluation use it. Not "
        "together with medtune.training_dataset.validation_share.",
    )
    suffix: str | None = Field(
        default=None,
        min_length=1,
        max_length=96,
        description="The tuned model's name (finetuned_model); default '<base model>-ft'.",
    )
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    hyperparameters: FineTuningHyperparameters = Field(default_factory=FineTuningHyperparameters)
    method: FineTuningMethod | None = Field(
        default=None,
        description="OpenAI's method: {type: 'supervised' | 'dpo', <type>: {hyperparameters}}; "
        "dpo trains on preference pairs (training_config.method 'dpo'), its beta is "
        "training_config.preference.beta. null: the medtune field's method, else supervised.",
    )
    medtune: dict[str, Any] | None = Field(
        default=None,
        description="medtune job spec sections (model_config, lora_config, training_dataset, "
        "training_config) merged under the OpenAI fields, which must agree with them.",
    )


class FineTuningError(BaseModel):
    code: str
    message: str
    param: str | None


class FineTuningJob(BaseModel):
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    model: str
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None
    organization_id: str
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    error: FineTuningError | None
    hyperparameters: dict[str, Any]
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    result_files: list[str]
    seed: int | None
    estimated_finish: int | None
    user_provided_suffix: str | None
    method: dict[str, Any] | None = Field(
        default=None, description="{type: supervised | dpo | orpo, <type>: {hyperparameters}}."
    )


class FineTuningJobsPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None


class FineTuningEventsPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class FineTuningCheckpoint(BaseModel):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuning_job_id: str
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: dict[str, Any]


class FineTuningCheckpointsPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningCheckpoint]
    has_more: bool
    first_id: str | None
    last_id: str | None
