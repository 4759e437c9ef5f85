"""Experiment tracking: MLflow's embedded store and W&B offline get every row, the masked spec
and the adapter; a tracker that fails is a note, never a failed job."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from core.errors import SpecError
from core.spec import JobSpec
from core.spec.job import SECRET_MASK
from core.training import tracking
from core.training.tracking import JobTracking, check_report_to, wanted
from core.training.tracking_runs import TrackerRun, flat_params, masked_uri
from tests.helpers import recipe_spec

SECRET = "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ="


def _spec(report_to: list[str] | None = None, **extra: Any) -> JobSpec:
    raw = recipe_spec("sample:medical_qa", max_steps=3, report_to=report_to)
    raw["webhook"] = {"url": "https://hooks.example.com/services/T000/B000/XXXX", "secret": SECRET}
    raw["training_dataset"]["rename_columns"] = {"Question?": "question"}
    raw.update(extra)
    return JobSpec.model_validate(raw)


def _rows() -> list[tuple[int, dict[str, float | None]]]:
    # Step 0: the held-out loss before training; an eval row later; a None is not a value.
    return [
        (0, {"eval_loss": 2.5}),
        (1, {"loss": 2.4, "learning_rate": 1e-4, "grad_norm": None}),
        (2, {"loss": 2.1, "learning_rate": 2e-4, "eval_loss": 2.2}),
        (3, {"loss": 1.9, "learning_rate": 1e-4}),
    ]


def test_params_are_the_flattened_spec_with_credentials_masked() -> None:
    spec = _spec()
    params = flat_params(spec.to_json())
    assert float(params["training_config.learning_rate"]) == spec.training.learning_rate
    assert params["lora_config.target_modules"].startswith('["q_proj"')
    assert params["webhook.secret"] == SECRET_MASK
    # A hook's path is its secret: only the host is kept.
    assert params["webhook.url"] == f"https://hooks.example.com/{SECRET_MASK}"
    assert not any(SECRET[6:20] in value or "XXXX" in value for value in params.values())
    # The user's own keys (column names) are one JSON value, never MLflow param keys.
    assert params["training_dataset.rename_columns"] == '{"Question?": "question"}'
    # Counts of tokens are not credentials; tokens are.
    params = flat_params({"evaluation_config": {"max_new_tokens": 128}, "hub": {"hf_token": "x"}})
    assert params == {"evaluation_config.max_new_tokens": "128", "hub.hf_token": SECRET_MASK}


def test_a_tracking_uri_is_shown_without_its_password() -> None:
    assert masked_uri("https://bob:pw@mlflow.internal:5000/x") == (
        f"https://{SECRET_MASK}@mlflow.internal:5000/x"
    )
    assert masked_uri("sqlite:////data/mlflow.db") == "sqlite:////data/mlflow.db"


def test_which_trackers_a_job_reports_to() -> None:
    assert wanted(_spec(), mlflow_uri=None, environ={}) == ["tensorboard"]
    env = {"WANDB_API_KEY": "k"}
    assert wanted(_spec(), mlflow_uri="http://m", environ=env) == ["tensorboard", "mlflow", "wandb"]
    # Given, exactly those (repeats once): the server's settings add nothing.
    assert wanted(_spec(["mlflow", "mlflow"]), mlflow_uri=None, environ=env) == ["mlflow"]


def test_submit_refuses_a_tracker_it_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SpecError) as missing_key:
        check_report_to(_spec(["tensorboard", "wandb"]), environ={})
    assert missing_key.value.code == "tracker_not_configured"
    assert missing_key.value.field == "training_config.report_to[1]"
    assert "WANDB_API_KEY" in missing_key.value.detail
    check_report_to(_spec(["wandb"]), environ={"WANDB_MODE": "offline"})  # files only: fine
    monkeypatch.setattr(tracking, "installed", lambda name: name != "mlflow")
    with pytest.raises(SpecError) as not_installed:
        check_report_to(_spec(["mlflow"]), environ={})
    assert not_installed.value.code == "tracker_not_installed"
    assert "medtune[tracking]" in not_installed.value.detail
    check_report_to(_spec(["mlflow"]), environ={}, check_packages=False)  # the API image


def _start(spec: JobSpec, tmp_path: Path, previous: Any = None, **env: str) -> JobTracking:
    return JobTracking.start(
        spec,
        job_id="job_0123456789abcdef01234567",
        job_dir=tmp_path / "job",
        home=tmp_path / "home",
        mlflow_uri=None,
        previous=previous,
        environ=env,
    )


def _log(runs: JobTracking) -> None:
    for sink in runs.sinks():
        for step, values in _rows():
            sink.log(step, values)
        sink.close()


def test_mlflow_embedded_store_holds_every_row_the_params_and_the_adapter(
    tmp_path: Path,
) -> None:
    from mlflow.tracking import MlflowClient

    runs = _start(_spec(["mlflow"]), tmp_path)
    assert not runs.tensorboard and not runs.notes
    location = runs.location()
    assert location is not None
    where = location["mlflow"]
    assert where["tracking_uri"] == f"sqlite:///{(tmp_path / 'home/mlflow/mlflow.db').resolve()}"
    _log(runs)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    runs.log_folder(adapter, name="adapter")
    runs.end("cancelled")
    assert runs.take_notes() == []

    client = MlflowClient(tracking_uri=where["tracking_uri"])
    run = client.get_run(where["run_id"])
    assert run.info.status == "KILLED"
    assert run.data.tags["medtune.job_id"] == "job_0123456789abcdef01234567"
    assert run.data.params["webhook.secret"] == SECRET_MASK
    assert run.data.params["training_config.max_steps"] == "3"
    history = {
        name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
        for name in ("loss", "eval_loss", "learning_rate")
    }
    assert history["eval_loss"] == [(0, 2.5), (2, 2.2)]
    assert history["loss"] == [(1, 2.4), (2, 2.1), (3, 1.9)]
    assert len(history["learning_rate"]) == 3
    assert "grad_norm" not in run.data.metrics  # only ever None
    assert [a.path for a in client.list_artifacts(run.info.run_id, "adapter")] == [
        "adapter/adapter_config.json"
    ]

    # A resumed job logs to the same run, RUNNING again, and ends it with its status.
    again = _start(_spec(["mlflow"]), tmp_path, previous=location)
    assert again.location() == location
    assert client.get_run(where["run_id"]).info.status == "RUNNING"
    again.end("succeeded")
    assert client.get_run(where["run_id"]).info.status == "FINISHED"


class _Broken(TrackerRun):
    name = "mlflow"

    def __init__(self) -> None:
        self.calls = 0

    def log_rows(self, rows: list[dict[str, Any]]) -> None:
        self.calls += 1
        raise ConnectionError("tracking server down")

    def end(self, status: str) -> None:
        raise AssertionError("a dropped run is not called again")


def test_a_failing_tracker_is_a_note_and_is_dropped(tmp_path: Path) -> None:
    runs = JobTracking()
    broken = _Broken()
    runs.runs.append(broken)
    sink = runs.sinks()[0]
    sink.log(1, {"loss": 1.0})
    sink.flush()  # a flush before a checkpoint must not raise
    sink.log(2, {"loss": 0.5})
    sink.close()
    runs.end("succeeded")
    assert broken.calls == 1
    notes = runs.take_notes()
    assert notes == [
        "mlflow: logging metrics failed, no more reported to it: "
        "ConnectionError: tracking server down"
    ]


def test_a_tracker_that_cannot_start_is_a_note(tmp_path: Path) -> None:
    # An unreachable tracking server: the job trains on, without the run.
    runs = JobTracking.start(
        _spec(["tensorboard", "mlflow"]),
        job_id="job_0123456789abcdef01234567",
        job_dir=tmp_path / "job",
        home=tmp_path / "home",
        mlflow_uri="unknown-scheme://nowhere",
        previous=None,
        environ={},
    )
    assert runs.runs == [] and runs.tensorboard and runs.location() is None
    [note] = runs.take_notes()
    assert note.startswith("mlflow: run not started: ")


def test_wandb_offline_writes_the_run_into_the_job_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    runs = _start(_spec(["wandb"]), tmp_path, WANDB_MODE="offline")
    assert not runs.notes, runs.notes
    location = runs.location()
    assert location is not None
    where = location["wandb"]
    assert where["mode"] == "offline" and where["run_id"] == "job_0123456789abcdef01234567"
    _log(runs)
    runs.end("succeeded")
    assert runs.take_notes() == []
    files = list((tmp_path / "job" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and Path(where["dir"]) == files[0].parent
    # wandb-core, a process of its own, may still be writing the file when finish() returns:
    # it is complete once it holds the run's exit record.
    deadline = time.monotonic() + 30
    while (history := _wandb_history(files[0])) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert history == [
        {"_step": 0, "eval_loss": 2.5},
        {"_step": 1, "loss": 2.4, "learning_rate": 1e-4},
        {"_step": 2, "loss": 2.1, "learning_rate": 2e-4, "eval_loss": 2.2},
        {"_step": 3, "loss": 1.9, "learning_rate": 1e-4},
    ]


def _wandb_history(path: Path) -> list[dict[str, Any]] | None:
    """The history rows of a .wandb file: wandb's LevelDB-style log (a 7-byte file header,
    32 KiB blocks of records with a 7-byte header: crc32, length, type full/first/middle/last;
    each record a wandb_internal_pb2.Record). None until the run's exit record is in."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        block_left = 32768 - pos % 32768
        if block_left < 7:  # the block's tail is padding
            pos += block_left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
    rows, ended = [], False
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        ended = ended or record.WhichOneof("record_type") == "exit"
        if record.WhichOneof("record_type") == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            rows.append({k: v for k, v in row.items() if not k.startswith("_") or k == "_step"})
    return rows if ended else None


def test_rows_carry_their_own_time(tmp_path: Path) -> None:
    # The time a step was logged, not the time of the batch write, is the metric's timestamp.
    seen: list[dict[str, Any]] = []

    class Keep(TrackerRun):
        name = "mlflow"

        def log_rows(self, rows: list[dict[str, Any]]) -> None:
            seen.extend(rows)

    runs = JobTracking()
    runs.runs.append(Keep())
    sink = runs.sinks()[0]
    before = datetime.now(UTC)
    sink.log(1, {"loss": 1.0})
    sink.close()
    assert seen[0]["step"] == 1 and before <= seen[0]["created_at"] <= datetime.now(UTC)


def test_a_server_tracking_uri_makes_every_job_report_to_mlflow(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'server.db'}"
    runs = JobTracking.start(
        _spec(),  # report_to null: TensorBoard, plus MLflow since the server names a store
        job_id="job_0123456789abcdef01234567",
        job_dir=tmp_path / "job",
        home=tmp_path / "home",
        mlflow_uri=uri,
        previous=None,
        environ={},
    )
    location = runs.location()
    assert runs.tensorboard and location is not None and set(location) == {"mlflow"}
    assert location["mlflow"]["tracking_uri"] == uri
    runs.end("failed")
    run = MlflowClient(tracking_uri=uri).get_run(location["mlflow"]["run_id"])
    assert run.info.status == "FAILED"
    assert not (tmp_path / "home" / "mlflow").exists()  # not the embedded store
