"""Persistence models: the job store is the source of truth, not the broker."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    String,
    UniqueConstraint,
    text,
)
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    return "job_" + uuid.uuid4().hex[:24]


def new_key_id() -> str:
    return "key_" + uuid.uuid4().hex[:16]


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex[:24]


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class JobStage(StrEnum):
    preparing_data = "preparing_data"
    training = "training"
    evaluating = "evaluating"
    exporting = "exporting"


def _ts(**kwargs: Any) -> Any:
    return Field(sa_column=Column(DateTime(timezone=True), **kwargs), default=None)


class Job(SQLModel, table=True):
    __tablename__ = "jobs"

    id: str = Field(default_factory=new_job_id, primary_key=True, max_length=40)
    created_at: datetime = Field(
        default_factory=utcnow,
        sa_column=Column(DateTime(timezone=True), nullable=False, index=True),
    )
    updated_at: datetime | None = _ts()
    started_at: datetime | None = _ts()
    finished_at: datetime | None = _ts()
    status: str = Field(default=JobStatus.queued, index=True, max_length=16)
    stage: str | None = Field(default=None, max_length=32)
    base_model: str = Field(max_length=300)
    finetuned_model: str = Field(max_length=100)
    spec: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    engine: str | None = Field(default=None, max_length=64)
    steps_done: int = 0
    steps_total: int | None = None
    cancel_requested: bool = False
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = None
    artifacts_dir: str | None = None
    adapter_dir: str | None = None
    worker: str | None = Field(default=None, max_length=200)
    # The running worker renews this lease; once it lapses the job is requeued and resumed.
    lease_expires_at: datetime | None = _ts(index=True)
    attempts: int = Field(default=0, sa_column_kwargs={"server_default": text("0")})
    # One entry per claim: attempt, worker, started_at, and once over ended_at and outcome.
    attempt_log: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON))
    queue: str | None = Field(default=None, max_length=100)
    # Set once the broker took the job's task; a queued job without it was never sent.
    enqueued_at: datetime | None = _ts()
    estimated_gpu_memory_gib: float | None = None
    dataset_stats: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # Wall seconds per stage of the last attempt (preparing_data, loading_model, training, ...).
    stage_seconds: dict[str, float] | None = Field(default=None, sa_column=Column(JSON))
    notes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # A webhook in the spec: pending until delivered (or failed for good); workers send it.
    webhook_state: str | None = Field(default=None, max_length=16, index=True)
    webhook_next_at: datetime | None = _ts()
    # event id and type, attempts, last_status, last_error, last_attempt_at, delivered_at
    webhook_delivery: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # Why training ended (max_steps, epochs, early_stopping, cancelled), whose weights were kept.
    stop_reason: str | None = Field(default=None, max_length=32)
    kept_step: int | None = None
    # Where the job's tracker runs are: {"mlflow": {tracking_uri, experiment_id, run_id}, ...}.
    tracking: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # The API key that created the job; null for jobs created with authentication disabled.
    owner_key_id: str | None = Field(
        default=None,
        sa_column=Column(
            String(40),
            ForeignKey("api_keys.id", name="fk_jobs_owner_key_id"),
            nullable=True,
            index=True,
        ),
    )


class MetricRow(SQLModel, table=True):
    """One logged training step. (job_id, step) is unique so a replayed step is never doubled."""

    __tablename__ = "job_metrics"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_job_metrics_job_step"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="jobs.id", index=True, max_length=40, ondelete="CASCADE")
    step: int
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    epoch: float | None = None
    tokens_per_second: float | None = None
    samples_per_second: float | None = None
    memory_mb: float | None = None
    reserved_memory_mb: float | None = None
    peak_memory_mb: float | None = None
    eta_seconds: float | None = None
    eval_loss: float | None = None
    # Preference jobs (dpo, orpo): TRL's rewards of the step's pairs, and of the held-out pairs.
    rewards_chosen: float | None = None
    rewards_rejected: float | None = None
    rewards_margin: float | None = None
    rewards_accuracy: float | None = None
    eval_rewards_margin: float | None = None
    eval_rewards_accuracy: float | None = None
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )


class Worker(SQLModel, table=True):
    """A training worker process, announced at start and refreshed while it lives.

    GPU workers consume a queue per memory class, so the API can route a job to a worker that
    can hold it, and refuse one that none can.
    """

    __tablename__ = "workers"

    name: str = Field(primary_key=True, max_length=200)
    queue: str = Field(max_length=100)
    gpu_name: str | None = Field(default=None, max_length=200)
    gpu_memory_gib: float | None = None
    last_seen: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )


class ApiKey(SQLModel, table=True):
    """A client's API key. Only the SHA-256 of the key is stored; the key is shown once.

    Keys are revoked, never deleted, so the jobs they own keep a valid owner.
    """

    __tablename__ = "api_keys"

    id: str = Field(default_factory=new_key_id, primary_key=True, max_length=40)
    name: str | None = Field(default=None, max_length=100)
    key_hash: str = Field(max_length=64, unique=True, index=True)
    prefix: str = Field(max_length=16, description="The key's first characters, to recognise it.")
    admin: bool = False
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    revoked_at: datetime | None = _ts()


class IdempotencyKey(SQLModel, table=True):
    """An Idempotency-Key sent with POST /jobs or POST /files, and the job or file it created
    (kept as long as that job or file).

    ``scope`` is who sent it (an API key id, ``admin`` or ``anonymous``): keys are per client.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        UniqueConstraint("scope", "key", name="uq_idempotency_keys_scope_key"),
        CheckConstraint(
            "(job_id IS NULL) <> (file_id IS NULL)", name="ck_idempotency_keys_one_target"
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    scope: str = Field(max_length=64)
    key: str = Field(max_length=255)
    fingerprint: str = Field(
        max_length=64, description="SHA-256 of the normalised job spec, or of the upload."
    )
    job_id: str | None = Field(
        default=None, foreign_key="jobs.id", index=True, max_length=40, ondelete="CASCADE"
    )
    file_id: str | None = Field(
        default=None, foreign_key="files.id", index=True, max_length=40, ondelete="CASCADE"
    )
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )


class DataFile(SQLModel, table=True):
    """A dataset file uploaded to the service (POST /files); a job spec names it by id.

    The bytes live under the data directory at ``path``; the row is the record of who owns it.
    """

    __tablename__ = "files"

    id: str = Field(default_factory=new_file_id, primary_key=True, max_length=40)
    filename: str = Field(max_length=255, description="The sanitised name the client sent.")
    purpose: str = Field(default="fine-tune", max_length=32)
    bytes: int
    sha256: str = Field(max_length=64, index=True)
    path: str = Field(description="Where the bytes are stored, under the service's data dir.")
    owner_key_id: str | None = Field(
        default=None,
        sa_column=Column(
            String(40),
            ForeignKey("api_keys.id", name="fk_files_owner_key_id"),
            nullable=True,
            index=True,
        ),
    )
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
