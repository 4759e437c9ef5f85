"""Experiment tracking beside TensorBoard: a job's run in MLflow and in Weights & Biases.

Which trackers a job reports to: ``training_config.report_to`` when the spec gives it (exactly
those), else TensorBoard plus MLflow when ``MEDTUNE_MLFLOW_TRACKING_URI`` is set and W&B when
``WANDB_API_KEY`` is set, read on the worker. MLflow without a tracking URI writes to its
embedded SQLite store, ``$MEDTUNE_HOME/mlflow/mlflow.db`` (artifacts beside it), so
``mlflow ui --backend-store-uri sqlite:///$MEDTUNE_HOME/mlflow/mlflow.db`` shows every job.

The trackers get the same rows as the job store (``TrackerSink`` is one more sink in the job's
TeeSink, so the step-0 held-out loss and every eval row reach them), the spec as flattened
params with secrets masked, and the adapter as an artifact. One run per job: a resumed or
retried attempt logs to the run the job row names. A tracker that fails is dropped for the rest
of the job with a note on it; it never fails the job.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.errors import SpecError
from core.spec import JobSpec
from core.training.sink import BufferedSink
from core.training.tracking_runs import MlflowRun, TrackerRun, WandbRun

log = logging.getLogger(__name__)

FIELD = "training_config.report_to"
INSTALL_HINT = "install the tracking extra on the worker (pip install 'medtune[tracking]')"


def wanted(spec: JobSpec, *, mlflow_uri: str | None, environ: Mapping[str, str]) -> list[str]:
    """The trackers this job reports to (see the module docstring)."""
    if spec.training.report_to is not None:
        return list(dict.fromkeys(spec.training.report_to))
    names = ["tensorboard"]
    if mlflow_uri:
        names.append("mlflow")
    if environ.get("WANDB_API_KEY"):
        names.append("wandb")
    return names


def installed(name: str) -> bool:
    """Whether ``name`` can be imported here; a finder that refuses it (ImportError) or a
    module without a spec (ValueError) counts as not installed, never as a failed request."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def distributed(name: str) -> bool:
    """Whether the distribution ``name`` is installed, read from its metadata: nothing is
    imported or even looked up as a module (the API image must not touch torch)."""
    from importlib import metadata

    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def wandb_configured(environ: Mapping[str, str]) -> bool:
    """W&B can log: a key to upload with, or a mode that needs none (offline writes files)."""
    return bool(environ.get("WANDB_API_KEY")) or environ.get("WANDB_MODE") in (
        "offline",
        "disabled",
    )


def check_report_to(
    spec: JobSpec, *, environ: Mapping[str, str], check_packages: bool = True
) -> None:
    """Refuse at submit a tracker the spec asks for that cannot work: its package missing
    (``tracker_not_installed``) or, for W&B, no key and no offline mode
    (``tracker_not_configured``). ``check_packages`` is false where this process is not the
    one that trains (the API image has no training stack; the worker notes it instead)."""
    for index, name in enumerate(spec.training.report_to or []):
        field = f"{FIELD}[{index}]"
        if name == "tensorboard":
            continue
        if check_packages and not installed(name):
            raise SpecError(
                f"report_to asks for {name}, whose package is not installed on this server: "
                f"{INSTALL_HINT}, or remove {name!r} from {FIELD}",
                field=field,
                code="tracker_not_installed",
            )
        if name == "wandb" and not wandb_configured(environ):
            raise SpecError(
                "report_to asks for wandb, and the server has no WANDB_API_KEY: set it (or "
                f"WANDB_MODE=offline to write the run to the job folder), or remove 'wandb' from "
                f"{FIELD}",
                field=field,
                code="tracker_not_configured",
            )


class TrackerSink(BufferedSink):
    """Hands the job's metric rows to a tracker in batches, on the sink's writer thread."""

    def __init__(self, tracking: JobTracking, run: TrackerRun) -> None:
        super().__init__(max_seconds=5.0)
        self.tracking, self.run = tracking, run

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        # Never raises: a tracker that fails must not fail the flush before a checkpoint.
        self.tracking.call(self.run, "logging metrics", self.run.log_rows, rows)


class JobTracking:
    """The job's runs in the trackers it reports to (TensorBoard is the job's own sink).

    ``start`` opens them (reusing the runs ``previous`` names: a resumed job), ``sinks`` gives
    a fresh sink per training attempt, ``log_folder`` uploads the adapter, and ``end`` closes
    the runs with the job's status. Failures become ``notes`` for the job, never errors.
    """

    def __init__(self) -> None:
        self.runs: list[TrackerRun] = []
        self.notes: list[str] = []
        self.tensorboard = True  # whether the job writes TensorBoard event files

    @classmethod
    def start(
        cls,
        spec: JobSpec,
        *,
        job_id: str,
        job_dir: Path,
        home: Path,
        mlflow_uri: str | None,
        previous: dict[str, Any] | None,
        environ: Mapping[str, str],
    ) -> JobTracking:
        tracking = cls()
        names = wanted(spec, mlflow_uri=mlflow_uri, environ=environ)
        tracking.tensorboard = "tensorboard" in names
        for name in names:
            if name == "tensorboard":
                continue
            if not installed(name):
                tracking.notes.append(f"{name}: not reported to: {INSTALL_HINT}")
                continue
            try:
                if name == "mlflow":
                    run: TrackerRun = MlflowRun.open(
                        spec, job_id=job_id, home=home, uri=mlflow_uri, previous=previous
                    )
                else:
                    run = WandbRun.open(
                        spec, job_id=job_id, job_dir=job_dir, previous=previous, environ=environ
                    )
            except Exception as exc:
                log.warning("job %s: %s run not started", job_id, name, exc_info=True)
                tracking.notes.append(f"{name}: run not started: {_brief(exc)}")
                continue
            tracking.runs.append(run)
        return tracking

    def location(self) -> dict[str, Any] | None:
        """Where each run is, for the job row (GET /jobs/{id} ``tracking``)."""
        return {run.name: run.location() for run in self.runs} or None

    def sinks(self) -> list[TrackerSink]:
        return [TrackerSink(self, run) for run in self.runs]

    def log_folder(self, folder: Path, *, name: str) -> None:
        for run in list(self.runs):
            self.call(run, f"uploading {name}", run.log_folder, folder, name=name)

    def end(self, status: str) -> None:
        """Close every run with the job's status (succeeded, failed or cancelled)."""
        for run in list(self.runs):
            self.call(run, "ending the run", run.end, status)
        self.runs = []

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes

    def call(self, run: TrackerRun, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if run not in self.runs:
            return  # failed before: dropped for the rest of the job
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            log.warning("%s: %s failed", run.name, what, exc_info=True)
            self.notes.append(f"{run.name}: {what} failed, no more reported to it: {_brief(exc)}")
            self.runs.remove(run)


def _brief(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"
