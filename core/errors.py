"""Domain errors. Each carries a stable ``code``; adapters map codes to HTTP statuses."""

from __future__ import annotations

from typing import Any


class MedtuneError(Exception):
    """Base of every error a client may see: a stable code, a message, and the field at fault."""

    code = "medtune_error"
    status = 400

    def __init__(self, detail: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        if code:
            self.code = code

    def as_dict(self) -> dict[str, Any]:
        """A JSON form that crosses the task queue; ``from_dict`` rebuilds it on the API side."""
        return {
            "code": self.code,
            "status": self.status,
            "detail": self.detail,
            "field": self.field,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MedtuneError:
        error = cls(data["detail"], field=data.get("field"), code=data["code"])
        error.status = data["status"]
        return error


class NotFoundError(MedtuneError):
    code = "not_found"
    status = 404


class JobNotFound(NotFoundError):
    code = "job_not_found"


class ConflictError(MedtuneError):
    code = "conflict"
    status = 409


class JobNotCancellable(ConflictError):
    code = "job_not_cancellable"


class JobNotReady(ConflictError):
    code = "job_not_ready"


class SpecError(MedtuneError):
    """The job spec is well-formed JSON but asks for something that cannot be done."""

    code = "invalid_spec"
    status = 422


class DatasetNotFound(SpecError):
    code = "dataset_not_found"


class DatasetError(SpecError):
    code = "dataset_invalid"


class ModelNotAvailable(SpecError):
    code = "model_not_available"


class HubUnavailable(MedtuneError):
    """A Hugging Face Hub download was needed and the Hub could not be reached."""

    code = "hub_unreachable"
    status = 424


class ServiceUnavailable(MedtuneError):
    code = "service_unavailable"
    status = 503


class InferenceTimeout(MedtuneError):
    code = "inference_timeout"
    status = 504


class JobCancelled(MedtuneError):
    """Raised inside a running job when a cancel request is seen at a step boundary."""

    code = "job_cancelled"
    status = 409


class OutOfMemory(MedtuneError):
    """Training does not fit the GPU even at the smallest micro-batch."""

    code = "cuda_out_of_memory"
    status = 422


class ExportError(MedtuneError):
    """An export format cannot be written or does not load back; it fails alone."""

    code = "export_failed"
    status = 422


class DiskFull(MedtuneError):
    """The volume holding a job's artifacts ran out of space while the job wrote to it."""

    code = "disk_full"
    status = 507


class ArtifactsUnwritable(MedtuneError):
    """A job's artifact folder cannot be created or written (read-only, no permission)."""

    code = "artifacts_unwritable"
    status = 500


class LeaseLost(ConflictError):
    """The worker's lease on a running job lapsed and the job was requeued: stop, write nothing."""

    code = "lease_lost"
