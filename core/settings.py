"""Service settings, read from ``MEDTUNE_*`` environment variables or an ``.env`` file."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_home() -> Path:
    return Path.cwd() / ".medtune"


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity (taskset, a container's cpuset), which can be
    fewer than the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity call on macOS or Windows
        return os.cpu_count() or 1


def default_llama_threads(*, inference_only: bool, cpus: int) -> int:
    """All ``cpus`` for a process that only serves inference, else half of them (at least 1)."""
    return max(1, cpus if inference_only else cpus // 2)


class Settings(BaseSettings):
    """Where medtune keeps its state and how its parts reach each other.

    The defaults are the embedded set-up: SQLite for jobs and a SQLite-backed Celery broker, so a
    laptop needs no server. Point ``database_url`` at Postgres and ``broker_url`` at Redis for
    production; nothing else changes.
    """

    model_config = SettingsConfigDict(env_prefix="MEDTUNE_", env_file=".env", extra="ignore")

    home: Path = Field(default_factory=_default_home, description="Root of medtune's state.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL of the job store.")
    broker_url: str | None = Field(default=None, description="Celery broker URL.")
    result_backend: str | None = Field(default=None, description="Celery result backend URL.")
    model_cache: Path | None = Field(default=None, description="Where converted models live.")
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    infer_timeout_s: float = Field(default=300.0, gt=0)
    infer_backend: Literal["auto", "transformers", "llama_cpp"] = Field(
        default="auto",
        description="Inference backend when a request names none: auto picks llama.cpp on a CPU "
        "worker when a GGUF of the model exists.",
    )
    infer_max_batch: int = Field(
        default=8, ge=1, le=64, description="Requests one inference batch may hold."
    )
    infer_batch_wait_ms: float = Field(
        default=5.0, ge=0, le=1000, description="How long a batch waits for more requests."
    )
    infer_concurrency: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Threads of an inference-only worker (requests it takes at once to batch).",
    )
    infer_warm: bool = Field(
        default=True,
        description="A training worker asks the inference workers to load a job's base model "
        "when the job starts training, and its adapter when it is saved, so the first answer "
        "loads nothing (skipped on a GPU that cannot hold training and inference at once).",
    )
    infer_preload: str | None = Field(
        default=None,
        description="A base model an inference worker loads when it starts (a name as "
        "base_model takes it), if its GPU has room beside a training job on that base.",
    )
    infer_fast: Literal["auto", "off"] = Field(
        default="auto",
        description="auto: on CUDA, an inference worker builds each asked adapter's CUDA-graph "
        "path in the background when the card has room (a bf16 copy of the base with the "
        "adapter merged, else the 4-bit base with the adapter) and answers with it once ready.",
    )
    infer_threads: int = Field(
        default=0,
        ge=0,
        le=512,
        description="CPU threads of the llama.cpp backend. 0 (the default) picks by the "
        "worker's role: every CPU the process may run on (its affinity: taskset, a container's "
        "cpuset) on a worker that serves only inference (-Q medtune.infer), half of them on a "
        "worker that also takes other queues (training, exports) and in any other process, "
        "because llama.cpp's threads spin-wait for each other and collapse when the cores are "
        "oversubscribed.",
    )
    lease_seconds: float = Field(
        default=300.0, gt=0, description="A running job's lease; renewed every third of it."
    )
    resend_queued_after_s: float = Field(
        default=600.0,
        gt=0,
        description="A queued job sent this long ago is sent again (the broker may have lost "
        "it); duplicates are harmless.",
    )
    reconcile_interval_s: float = Field(
        default=30.0, gt=0, description="How often a worker requeues jobs whose lease lapsed."
    )
    db_retry_s: float = Field(
        default=120.0,
        ge=0,
        description="How long a worker waits for an unreachable database (retrying with "
        "backoff) before a write fails: a database restart pauses a job instead of failing it.",
    )
    keep_base_model: bool = Field(
        default=True,
        description="A training worker keeps its last job's base model loaded (the adapter "
        "removed, the base restored as loaded and checked) and reuses it for the next job on "
        "the same base; a job on another base frees it first.",
    )
    skip_checkpointing_when_room: bool = Field(
        default=True,
        description="On CUDA, a job trains without gradient checkpointing when the card holds "
        "its largest step without it (the same math, no layer run twice); the job's notes say "
        "so. false: always as lora_config.use_gradient_checkpointing asks.",
    )
    prepared_cache_bytes: int = Field(
        default=2 * 1024**3,
        ge=0,
        description="Prepared (tokenized) datasets kept under $MEDTUNE_HOME/cache/prepared, by "
        "content, so a job on data prepared before skips the data stage; least recently used "
        "entries go past this size; deleting a job deletes the entry it used; 0: no cache.",
    )
    visibility_timeout_s: float = Field(
        default=24 * 3600.0,
        gt=0,
        description="Redis broker: an unacknowledged task is handed out again after this long "
        "(the job's database claim makes that second delivery a no-op).",
    )
    api_max_inflight: int = Field(
        default=24,
        ge=1,
        le=1000,
        description="API requests served at once before their responses start; more wait their "
        "turn (503 server_busy after 30 s). Keep it below the database pool (50) so requests "
        "never wait on each other for connections.",
    )
    env: str = Field(default="development", description="development or production")
    auth: Literal["required", "disabled", "auto"] = Field(
        default="auto",
        description="API keys: required, disabled, or auto (required unless the API is bound "
        "to loopback).",
    )
    admin_key: SecretStr | None = Field(
        default=None, description="An admin API key from the environment; sees every job."
    )
    data_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders dataset paths may point into, besides the shipped samples and "
        "$MEDTUNE_HOME/data: a JSON list, or paths separated by the OS path separator (:).",
    )
    model_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders a local base_model may point into, besides the model cache "
        "(MEDTUNE_MODEL_CACHE): a JSON list, or paths separated by the OS path separator (:).",
    )
    max_upload_bytes: int = Field(
        default=512 * 1024**2,
        gt=0,
        description="Largest dataset file POST /files accepts (bytes); larger uploads are cut "
        "off while streaming with 413 file_too_large.",
    )
    rate_jobs_per_minute: int = Field(
        default=30, ge=0, description="Jobs one API key may create per minute (0: no limit)."
    )
    rate_infer_per_minute: int = Field(
        default=120,
        ge=0,
        description="Inference and preview requests per API key per minute (0: no limit).",
    )

    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="Where jobs log their MLflow runs (a tracking server, databricks, a "
        "database URL); set, every job reports to MLflow unless its report_to says otherwise. "
        "Unset: jobs that ask for mlflow use the embedded sqlite:///$MEDTUNE_HOME/mlflow/mlflow.db.",
    )

    retention_days: float = Field(
        default=0,
        ge=0,
        description="Finished jobs (rows, metrics, artifacts) and uploads no job that stays "
        "names are removed once older than this many days; 0 keeps everything.",
    )
    retention_interval_s: float = Field(
        default=3600.0, gt=0, description="How often a worker sweeps for what retention removes."
    )

    webhook_allow_private: bool = Field(
        default=False,
        description="Let job webhooks target loopback and private-network addresses (refused "
        "by default: a job spec must not make the service call inward).",
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=120, description="Per attempt.")
    webhook_backoff_s: float = Field(
        default=2.0, gt=0, description="Wait after a failed attempt; doubles each time (<= 300 s)."
    )
    webhook_retry_s: float = Field(
        default=3600.0, gt=0, description="A delivery still failing after this long is given up."
    )
    webhook_poll_s: float = Field(
        default=2.0, gt=0, description="How often a worker looks for webhooks to deliver."
    )

    @field_validator("database_url", "broker_url", "result_backend")
    @classmethod
    def _normalise_postgres(cls, value: str | None) -> str | None:
        # Users paste libpq URLs; SQLAlchemy needs the driver named.
        if value and value.startswith(("postgres://", "postgresql://")):
            return "postgresql+psycopg://" + value.split("://", 1)[1]
        return value

    @field_validator("data_roots", "model_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part for part in text.split(os.pathsep) if part]
        return value

    @field_validator("admin_key")
    @classmethod
    def _strong_admin_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if len(value.get_secret_value()) < 24:
            raise ValueError(
                "MEDTUNE_ADMIN_KEY is too short to be a secret (under 24 characters); make one "
                "with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return value

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'medtune.db'}"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.home / 'broker.db'}"

    @property
    def celery_result_backend(self) -> str:
        if self.result_backend:
            return self.result_backend
        if self.celery_broker_url.startswith(("redis://", "rediss://")):
            return self.celery_broker_url
        return "db+" + self.db_url

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "jobs"

    @property
    def models_dir(self) -> Path:
        return self.model_cache or self.home / "models"

    @property
    def data_dir(self) -> Path:
        """Where datasets for jobs go by default: always an allowed dataset root."""
        return self.home / "data"

    @property
    def uploads_dir(self) -> Path:
        """Uploaded dataset files (POST /files), one folder per file id; named by id only."""
        return self.data_dir / "uploads"

    @property
    def prepared_cache_dir(self) -> Path:
        """Prepared datasets by content hash (core.data.prepared_cache)."""
        return self.home / "cache" / "prepared"

    def llama_threads(self, *, inference_only: bool, cpus: int | None = None) -> int:
        """``infer_threads`` when set, else the default for the role (see its description)."""
        if self.infer_threads:
            return self.infer_threads
        return default_llama_threads(
            inference_only=inference_only, cpus=usable_cpus() if cpus is None else cpus
        )

    def ensure_dirs(self) -> None:
        for path in (self.home, self.artifacts_dir, self.models_dir, self.data_dir):
            path.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
