"""OpenAI fine-tuning shapes mapped onto medtune jobs (pure functions, no I/O).

``POST /v1/fine_tuning/jobs`` bodies become medtune job specs, and medtune's jobs, metric rows
and checkpoints become OpenAI's ``fine_tuning.job``, ``fine_tuning.job.event`` and
``fine_tuning.job.checkpoint`` objects. The routes in ``api/routes/openai_ft.py`` only read the
store and call these.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from core.errors import MedtuneError, SpecError
from core.store.models import Job, JobStatus, MetricRow

# The recipe's learning rate: learning_rate_multiplier 1 means this.
BASE_LEARNING_RATE = 2e-4
AUTO = "auto"
OPENAI_STATUS = {
    JobStatus.queued: "queued",
    JobStatus.running: "running",
    JobStatus.succeeded: "succeeded",
    JobStatus.failed: "failed",
    JobStatus.cancelled: "cancelled",
}
# Where a spec field came from in an OpenAI body, so an error names the field the client sent.
_TOP_LEVEL_FIELDS = {
    "model_config.base_model": "model",
    "model_config.finetuned_model": "suffix",
    "training_dataset.name": "training_file",
    "training_config.seed": "seed",
}
# Set from validation_file when the request has one (else they came from the medtune field).
_VALIDATION_FILE_FIELDS = ("validation_dataset", "validation_dataset.name")
_HYPERPARAMETER_FIELDS = {
    "training_config.num_train_epochs": "n_epochs",
    "training_config.per_device_train_batch_size": "batch_size",
    "training_config.gradient_accumulation_steps": "batch_size",
    "training_config.learning_rate": "learning_rate_multiplier",
}
# Failure codes whose cause is one request field, for the error's ``param``.
_ERROR_PARAMS = {
    "dataset_not_found": "training_file",
    "dataset_invalid": "training_file",
    "dataset_not_preference": "training_file",
    "model_not_available": "model",
    "hub_unreachable": "model",
}
PREFERENCE_METRICS = ("rewards_margin", "rewards_accuracy", "eval_rewards_margin")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_PHASES = {"created": 0, "started": 1, "step": 2, "finished": 3}


class ConflictingFields(SpecError):
    code = "conflicting_fields"


class InvalidEventId(MedtuneError):
    code = "invalid_cursor"
    status = 400


# --- request -> spec ----------------------------------------------------------------------------


def default_finetuned_name(model: str) -> str:
    """``<base model's last path part>-ft``, cut to what a finetuned_model name allows."""
    tail = _UNSAFE.sub("-", model.rstrip("/").rsplit("/", 1)[-1]).strip("-._") or "model"
    return f"{tail[:93]}-ft"


def _put(spec: dict[str, Any], section: str, key: str, value: Any, *, source: str) -> None:
    """Set spec[section][key], refusing a different value already given in the medtune field."""
    part = spec.setdefault(section, {})
    if not isinstance(part, dict):
        return  # the spec validation names the section that is not an object
    if key in part and part[key] != value:
        raise ConflictingFields(
            f"{source} sets {section}.{key} to {value!r} but medtune.{section}.{key} is "
            f"{part[key]!r}; give it in one place",
            field=f"medtune.{section}.{key}",
        )
    part[key] = value


def _resolve_batch(training: Mapping[str, Any], batch_size: int) -> tuple[int, int]:
    """Micro-batch and accumulation for an effective batch of ``batch_size`` examples.

    The micro-batch stays the one asked for in the medtune field (default: the recipe's 2) when
    it divides the batch, so memory use does not grow with the batch; otherwise the whole batch
    is one micro-batch.
    """
    micro = training.get("per_device_train_batch_size", 2)
    if isinstance(micro, int) and 0 < micro <= batch_size and batch_size % micro == 0:
        return micro, batch_size // micro
    return batch_size, 1


def spec_from_request(
    *,
    model: str,
    training_file: str,
    validation_file: str | None = None,
    suffix: str | None = None,
    seed: int | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    medtune: Mapping[str, Any] | None = None,
    method: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The medtune job spec (JSON, unvalidated) for an OpenAI create-job body.

    ``method`` is OpenAI's method as ``{"type", "hyperparameters"}``: type "dpo" sets
    ``training_config.method`` 'dpo' and its beta ``training_config.preference.beta``;
    "supervised" sets 'sft'. Its other hyperparameters act as the top-level ones do.

    ``medtune`` holds spec sections merged first; the OpenAI fields then set their spec fields
    and must agree with what the medtune field says about the same ones. Hyperparameters left
    "auto" keep the recipe's values (or the medtune field's); ``batch_size`` is the effective
    batch (micro-batch x gradient accumulation), ``learning_rate_multiplier`` scales 2e-4.
    ``validation_file`` becomes ``validation_dataset.name``.
    """
    spec: dict[str, Any] = copy.deepcopy(dict(medtune or {}))
    hyperparameters = _with_method(hyperparameters, method)
    if method is not None:
        kind = "dpo" if method["type"] == "dpo" else "sft"
        _put(spec, "training_config", "method", kind, source="method.type")
        beta = method["hyperparameters"].get("beta", AUTO)
        if beta != AUTO:
            _put_beta(spec, beta)
    _put(spec, "model_config", "base_model", model, source="model")
    finetuned = suffix
    if finetuned is None and "finetuned_model" not in spec.get("model_config", {}):
        finetuned = default_finetuned_name(model)
    if finetuned is not None:
        _put(spec, "model_config", "finetuned_model", finetuned, source="suffix")
    _put(spec, "training_dataset", "name", training_file, source="training_file")
    if validation_file is not None:
        if spec.get("validation_dataset") is None:  # absent, or null in the medtune field
            spec["validation_dataset"] = {}
        _put(spec, "validation_dataset", "name", validation_file, source="validation_file")
    if seed is not None:
        _put(spec, "training_config", "seed", seed, source="seed")
    hp = dict(hyperparameters or {})
    training = spec.get("training_config", {})
    if hp.get("n_epochs", AUTO) != AUTO:
        _put(spec, "training_config", "num_train_epochs", hp["n_epochs"], source="n_epochs")
    if hp.get("batch_size", AUTO) != AUTO and isinstance(training, dict):
        micro, accumulation = _resolve_batch(training, int(hp["batch_size"]))
        source = "hyperparameters.batch_size"
        _put(spec, "training_config", "per_device_train_batch_size", micro, source=source)
        _put(spec, "training_config", "gradient_accumulation_steps", accumulation, source=source)
    if hp.get("learning_rate_multiplier", AUTO) != AUTO:
        rate = BASE_LEARNING_RATE * float(hp["learning_rate_multiplier"])
        _put(
            spec,
            "training_config",
            "learning_rate",
            rate,
            source="hyperparameters.learning_rate_multiplier",
        )
    return spec


def _with_method(
    hyperparameters: Mapping[str, Any] | None, method: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The top-level hyperparameters with the method's filled in; both giving one: the same."""
    merged = dict(hyperparameters or {})
    if method is None:
        return merged
    for key, value in method["hyperparameters"].items():
        if key == "beta" or value == AUTO:
            continue
        if merged.get(key, AUTO) not in (AUTO, value):
            raise ConflictingFields(
                f"hyperparameters.{key} is {merged[key]!r} and method.{method['type']}."
                f"hyperparameters.{key} is {value!r}; give it in one place",
                field=f"method.{method['type']}.hyperparameters.{key}",
            )
        merged[key] = value
    return merged


def _put_beta(spec: dict[str, Any], beta: float) -> None:
    training = spec.setdefault("training_config", {})
    if not isinstance(training, dict):
        return  # the spec validation names the section that is not an object
    preference = training.get("preference")
    if preference is None:
        preference = training["preference"] = {}
    if not isinstance(preference, dict):
        return
    if preference.get("beta", beta) != beta:
        raise ConflictingFields(
            f"method.dpo.hyperparameters.beta is {beta!r} but medtune.training_config."
            f"preference.beta is {preference['beta']!r}; give it in one place",
            field="medtune.training_config.preference.beta",
        )
    preference["beta"] = beta


def request_field(
    spec_field: str,
    *,
    hyperparameters: Mapping[str, Any] | None = None,
    validation_file: str | None = None,
    method: Mapping[str, Any] | None = None,
) -> str:
    """The OpenAI body field a spec error is about (``medtune.<field>`` when it came from there)."""
    if method is not None and spec_field == "training_config.method":
        return "method.type"
    beta = (method or {}).get("hyperparameters", {}).get("beta", AUTO)
    if beta != AUTO and spec_field.startswith("training_config.preference"):
        return "method.dpo.hyperparameters.beta"
    if spec_field in _TOP_LEVEL_FIELDS:
        return _TOP_LEVEL_FIELDS[spec_field]
    if validation_file is not None and spec_field in _VALIDATION_FILE_FIELDS:
        return "validation_file"
    name = _HYPERPARAMETER_FIELDS.get(spec_field)
    if name and (hyperparameters or {}).get(name, AUTO) != AUTO:
        return f"hyperparameters.{name}"
    if spec_field in ("", "body"):
        return "body"
    return f"medtune.{spec_field}"


# --- job -> fine_tuning.job ---------------------------------------------------------------------


def _seconds(stamp: datetime) -> float:
    # SQLite hands back naive datetimes; every stamp medtune stores is UTC.
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def unix(stamp: datetime | None) -> int | None:
    """Whole Unix seconds, as OpenAI's created_at/finished_at are."""
    return None if stamp is None else int(_seconds(stamp))


def hyperparameters_of(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved values, as OpenAI reports them on a job."""
    training = spec.get("training_config", {})
    epochs = float(training.get("num_train_epochs", 1))
    rate = float(training.get("learning_rate", BASE_LEARNING_RATE))
    return {
        "n_epochs": int(epochs) if epochs.is_integer() else epochs,
        "batch_size": int(training.get("per_device_train_batch_size", 2))
        * int(training.get("gradient_accumulation_steps", 4)),
        # Rounded so 2e-3 reads 10, not 10.000000000000002.
        "learning_rate_multiplier": round(rate / BASE_LEARNING_RATE, 9),
    }


def estimated_finish(job: Job, recent: Sequence[MetricRow]) -> int | None:
    """Unix seconds when a running job should end, from the step rate of its recent rows."""
    if job.status != JobStatus.running or not job.steps_total or len(recent) < 2:
        return None
    rows = sorted(recent, key=lambda r: r.step)
    first, last = rows[0], rows[-1]
    seconds = _seconds(last.created_at) - _seconds(first.created_at)
    if last.step <= first.step or seconds <= 0:
        return None
    per_step = seconds / (last.step - first.step)
    left = max(job.steps_total - last.step, 0)
    return math.ceil(_seconds(last.created_at) + left * per_step)


def job_error(job: Job) -> dict[str, str | None] | None:
    if not job.error_code:
        return None
    param = _ERROR_PARAMS.get(job.error_code)
    # Errors about the validation set say so first (core.data.validation.scoped).
    if param == "training_file" and (job.error_message or "").startswith("validation_dataset:"):
        param = "validation_file"
    return {
        "code": job.error_code,
        "message": job.error_message or job.error_code,
        "param": param,
    }


def job_object(job: Job, recent: Sequence[MetricRow] = ()) -> dict[str, Any]:
    """A ``fine_tuning.job``; ``recent`` are the latest metric rows, for estimated_finish."""
    spec = job.spec
    stats = job.dataset_stats or {}
    return {
        "object": "fine_tuning.job",
        "id": job.id,
        "model": job.base_model,
        "created_at": unix(job.created_at),
        "finished_at": unix(job.finished_at),
        "fine_tuned_model": job.finetuned_model if job.status == JobStatus.succeeded else None,
        "organization_id": "medtune",
        "status": OPENAI_STATUS.get(JobStatus(job.status), job.status),
        "error": job_error(job),
        "hyperparameters": hyperparameters_of(spec),
        "trained_tokens": stats.get("trained_tokens"),
        "training_file": spec.get("training_dataset", {}).get("name"),
        "validation_file": (spec.get("validation_dataset") or {}).get("name"),
        "result_files": [],
        "seed": spec.get("training_config", {}).get("seed"),
        "estimated_finish": estimated_finish(job, recent),
        "user_provided_suffix": job.finetuned_model,
        "method": method_object(spec),
    }


def method_object(spec: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI's ``method`` of a job: supervised, dpo (with beta), or medtune's orpo."""
    training = spec.get("training_config", {})
    kind = {"sft": "supervised"}.get(training.get("method", "sft"), training.get("method"))
    hyperparameters = hyperparameters_of(spec)
    if kind != "supervised":
        hyperparameters["beta"] = (training.get("preference") or {}).get("beta", 0.1)
    return {"type": kind, kind: {"hyperparameters": hyperparameters}}


# --- events -------------------------------------------------------------------------------------


def event_id(job_id: str, phase: str, step: int | None = None) -> str:
    return f"ftevent-{job_id}-{phase}" + (f"-{step}" if step is not None else "")


def event_key(job_id: str, value: str) -> tuple[int, int]:
    """(phase, step) of an event id this API returned: events sort by it, oldest first."""
    prefix = f"ftevent-{job_id}-"
    if value.startswith(prefix):
        phase, _, step = value[len(prefix) :].partition("-")
        if phase == "step" and step.isdigit():
            return _PHASES["step"], int(step)
        if phase in _PHASES and phase != "step" and not step:
            return _PHASES[phase], 0
    raise InvalidEventId(
        f"after {value!r} is not an event id of job {job_id}; pass the id of an event from a "
        "previous page",
        field="after",
    )


def metrics_before(after: tuple[int, int] | None) -> int | None:
    """Metric rows older than the event ``after`` have a step below this (None: no bound)."""
    if after is None or after[0] > _PHASES["step"]:
        return None
    if after[0] == _PHASES["step"]:
        return after[1]
    return 0  # before "started": no metric row is older


def _event(
    job: Job,
    phase: str,
    *,
    at: datetime | None,
    message: str,
    level: str = "info",
    step: int | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "object": "fine_tuning.job.event",
        "id": event_id(job.id, phase, step),
        "created_at": unix(at or job.updated_at or job.created_at),
        "level": level,
        "message": message,
        "type": "metrics" if data is not None else "message",
        "data": data,
    }


def metric_event(job: Job, row: MetricRow) -> dict[str, Any]:
    total = f"/{job.steps_total}" if job.steps_total else ""
    loss = f"{row.loss:.4f}" if row.loss is not None else "n/a"
    data = {
        "step": row.step,
        "total_steps": job.steps_total,
        "train_loss": row.loss,
        "learning_rate": row.learning_rate,
        "grad_norm": row.grad_norm,
        "epoch": row.epoch,
        "tokens_per_second": row.tokens_per_second,
    }
    for name in PREFERENCE_METRICS:  # dpo / orpo jobs only
        if getattr(row, name, None) is not None:
            data[name] = getattr(row, name)
    return _event(
        job,
        "step",
        at=row.created_at,
        step=row.step,
        message=f"Step {row.step}{total}: training loss={loss}",
        data=data,
    )


def _finished_event(job: Job) -> dict[str, Any] | None:
    status = JobStatus(job.status)
    if not status.terminal:
        return None
    if status == JobStatus.succeeded:
        level, message = "info", "The job has successfully completed"
    elif status == JobStatus.failed:
        detail = job.error_message or job.error_code or "unknown error"
        level, message = "error", f"The job failed: {detail}"
    else:
        level, message = "warn", f"The job was cancelled after {job.steps_done} steps"
    return _event(job, "finished", at=job.finished_at, level=level, message=message)


def events_page(
    job: Job, rows_newest_first: Sequence[MetricRow], *, after: str | None, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """Events older than ``after``, newest first, as OpenAI lists them; and whether more exist.

    ``rows_newest_first`` must hold at least ``limit + 1`` of the metric rows older than
    ``after`` (all of them if fewer), newest first: see ``metrics_before``.
    """
    bound = event_key(job.id, after) if after else None
    newest: list[dict[str, Any]] = []
    finished = _finished_event(job)
    if finished:
        newest.append(finished)
    newest += [metric_event(job, r) for r in rows_newest_first]
    if job.started_at:
        newest.append(_event(job, "started", at=job.started_at, message="Fine-tuning job started"))
    newest.append(
        _event(job, "created", at=job.created_at, message=f"Created fine-tuning job: {job.id}")
    )
    if bound is not None:
        newest = [e for e in newest if event_key(job.id, e["id"]) < bound]
    return newest[:limit], len(newest) > limit


# --- checkpoints --------------------------------------------------------------------------------


def checkpoint_object(
    job: Job, *, step: int, created_at: datetime, loss: float | None
) -> dict[str, Any]:
    return {
        "object": "fine_tuning.job.checkpoint",
        "id": f"ftckpt-{job.id}-{step}",
        "created_at": unix(created_at),
        "fine_tuning_job_id": job.id,
        "fine_tuned_model_checkpoint": f"{job.finetuned_model}:ckpt-step-{step}",
        "step_number": step,
        "metrics": {"step": step, "train_loss": loss},
    }
