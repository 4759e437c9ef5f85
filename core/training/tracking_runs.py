"""The tracker runs behind core.training.tracking: MLflow (through ``MlflowClient``, so nothing
global such as ``mlflow.active_run`` is shared between the jobs of one worker) and W&B, and what
they log: the spec as flat params with credentials masked, and each metric row's numbers.
mlflow and wandb are imported only when a run opens."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from core.spec import JobSpec
from core.spec.job import SECRET_MASK, public_spec

MLFLOW_DIR = "mlflow"
EXPERIMENT_ENV = "MEDTUNE_MLFLOW_EXPERIMENT"
_BATCH_METRICS = 1000  # MLflow's limit per log_batch call
_BATCH_PARAMS = 100

# Key names whose values are credentials (webhook secret, Hub tokens, passwords); "max_tokens"
# and other counts of tokens are not.
_SECRET_KEY = re.compile(r"(?:^|_)(?:secret|password|passwd|token|api_key|apikey|credentials?)$")
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PARAM_VALUE_MAX = 6000  # MLflow refuses longer param values
# What MLflow's run status is when the job ends with each status.
MLFLOW_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}


def masked_uri(uri: str) -> str:
    """A tracking URI without the user and password it may carry."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, f"{SECRET_MASK}@{netloc}", parts.path, parts.query, ""))


def flat_params(spec: dict[str, Any]) -> dict[str, str]:
    """The spec as ``section.key`` -> text: lists as JSON, credentials masked, and the webhook
    URL cut to its host (a hook's path often is its secret)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        # Spec sections are flattened; a map of the user's own keys (rename_columns: column
        # names MLflow may refuse as param keys) stays one JSON value.
        if isinstance(value, dict) and value and all(_FIELD_NAME.match(str(k)) for k in value):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
            return
        last = prefix.rsplit(".", 1)[-1].lower()
        if value not in (None, "") and _SECRET_KEY.search(last):
            text = SECRET_MASK
        elif prefix == "webhook.url" and isinstance(value, str):
            parts = urlsplit(value)
            text = f"{parts.scheme}://{parts.hostname}/{SECRET_MASK}"
        else:
            text = value if isinstance(value, str) else json.dumps(value)
        out[prefix] = text[:_PARAM_VALUE_MAX]

    walk("", public_spec(spec))
    return out


def metric_values(row: Mapping[str, Any]) -> dict[str, float]:
    """A metric row's numbers, as the job store keeps them (step and time left out)."""
    return {
        name: float(value)
        for name, value in row.items()
        if name not in ("step", "created_at") and isinstance(value, int | float)
    }


class TrackerRun:
    """One tracker's run of a job; every call may raise, and ``JobTracking`` guards them."""

    name = ""

    def location(self) -> dict[str, Any]:
        raise NotImplementedError

    def log_rows(self, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def log_folder(self, folder: Path, *, name: str) -> None:
        raise NotImplementedError

    def end(self, status: str) -> None:
        raise NotImplementedError


def default_mlflow_uri(home: Path) -> str:
    """The embedded store: one SQLite file for every job of this MEDTUNE_HOME."""
    return f"sqlite:///{(home / MLFLOW_DIR / 'mlflow.db').resolve()}"


class MlflowRun(TrackerRun):
    name = "mlflow"

    def __init__(self, client: Any, *, uri: str, experiment_id: str, run_id: str) -> None:
        self.client, self.uri = client, uri
        self.experiment_id, self.run_id = experiment_id, run_id

    @classmethod
    def open(
        cls,
        spec: JobSpec,
        *,
        job_id: str,
        home: Path,
        uri: str | None,
        previous: dict[str, Any] | None,
    ) -> MlflowRun:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        artifacts: str | None = None
        if not uri:
            (home / MLFLOW_DIR).mkdir(parents=True, exist_ok=True)
            uri = default_mlflow_uri(home)
            artifacts = (home / MLFLOW_DIR / "artifacts").resolve().as_uri()
        client = MlflowClient(tracking_uri=uri)
        earlier = (previous or {}).get("mlflow") or {}
        if earlier.get("run_id") and earlier.get("tracking_uri") == masked_uri(uri):
            run = _existing(client, earlier["run_id"])
            if run is not None:  # a resumed job: the same run, RUNNING again
                client.update_run(run.info.run_id, status="RUNNING")
                return cls(
                    client, uri=uri, experiment_id=run.info.experiment_id, run_id=run.info.run_id
                )
        experiment_id = _experiment(client, os.environ.get(EXPERIMENT_ENV) or "medtune", artifacts)
        run = client.create_run(
            experiment_id,
            run_name=job_id,
            tags={
                "medtune.job_id": job_id,
                "medtune.base_model": spec.model.base_model,
                "medtune.finetuned_model": spec.model.finetuned_model,
            },
        )
        params = [Param(k, v) for k, v in flat_params(spec.to_json()).items()]
        for start in range(0, len(params), _BATCH_PARAMS):
            client.log_batch(run.info.run_id, params=params[start : start + _BATCH_PARAMS])
        return cls(client, uri=uri, experiment_id=experiment_id, run_id=run.info.run_id)

    def location(self) -> dict[str, Any]:
        return {
            "tracking_uri": masked_uri(self.uri),
            "experiment_id": self.experiment_id,
            "run_id": self.run_id,
        }

    def log_rows(self, rows: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        metrics = [
            Metric(name, value, int(row["created_at"].timestamp() * 1000), row["step"])
            for row in rows
            for name, value in metric_values(row).items()
        ]
        for start in range(0, len(metrics), _BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + _BATCH_METRICS])

    def log_folder(self, folder: Path, *, name: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path=name)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS.get(status, "FAILED"))


def _existing(client: Any, run_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None  # the store was reset or moved: start a new run


def _experiment(client: Any, name: str, artifacts: str | None) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=artifacts))
    except MlflowException:  # another worker created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


class WandbRun(TrackerRun):
    """A W&B run whose id is the job id, so a resumed attempt continues it (resume="allow").
    Its local files go under the job folder (``wandb/``); WANDB_MODE=offline keeps them there."""

    name = "wandb"

    def __init__(self, run: Any) -> None:
        self.run = run

    @classmethod
    def open(
        cls,
        spec: JobSpec,
        *,
        job_id: str,
        job_dir: Path,
        previous: dict[str, Any] | None,
        environ: Mapping[str, str],
    ) -> WandbRun:
        import wandb

        job_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=environ.get("WANDB_PROJECT") or "medtune",
            entity=environ.get("WANDB_ENTITY") or None,
            id=job_id,
            name=job_id,
            resume="allow",
            dir=str(job_dir),
            config=flat_params(spec.to_json()),
            tags=["medtune", spec.model.finetuned_model[:64]],
            reinit="create_new",  # a worker runs many jobs, some after a failed one
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
        return cls(run)

    def location(self) -> dict[str, Any]:
        run = self.run
        return {
            "project": run.project,
            "entity": run.entity or None,
            "run_id": run.id,
            "url": None if run.offline else run.url,
            "dir": str(Path(run.dir).parent),
            "mode": "offline" if run.offline else "online",
        }

    def log_rows(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            values = metric_values(row)
            if values:
                self.run.log(values, step=row["step"])

    def log_folder(self, folder: Path, *, name: str) -> None:
        import wandb

        artifact = wandb.Artifact(f"{self.run.id}-{name}", type="model")
        artifact.add_dir(str(folder))
        self.run.log_artifact(artifact)

    def end(self, status: str) -> None:
        self.run.summary["medtune_status"] = status
        self.run.finish(exit_code=0 if status == "succeeded" else 1)
