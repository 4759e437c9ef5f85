"""A continued-pretraining job (format "text") through POST /jobs, trained on the CPU, reporting
to TensorBoard, MLflow's embedded store and W&B offline: each tracker holds the rows GET
/jobs/{id}/metrics serves, and GET /jobs/{id} and `medtune jobs show` say where the runs are."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cli.jobs import show_text
from core.pipeline import run_job
from core.settings import Settings
from core.store.models import JobStatus
from tests.api.in_process import Api, assert_problem
from tests.api.in_process import api as api  # the in-process API fixture
from tests.core.training.test_tracking import _wandb_history
from tests.helpers import recipe_spec

WORDS = ["anemia", "iron", "ferritin", "hemoglobin", "fatigue", "pallor", "marrow", "folate"]


def _corpus(path: Path) -> Path:
    docs = [" ".join(WORDS[(i + k) % 8] for k in range(30 + 7 * i)) for i in range(20)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_report_to_a_tracker_the_server_cannot_start_is_refused(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    spec = recipe_spec("sample:medical_qa", max_steps=1, report_to=["tensorboard", "wandb"])
    body = assert_problem(
        api.client.post("/jobs", json=spec),
        422,
        "tracker_not_configured",
        "training_config.report_to[1]",
    )
    assert "WANDB_API_KEY" in body["detail"]
    spec["training_config"]["report_to"] = ["comet"]
    assert api.client.post("/jobs", json=spec).status_code == 422


def test_a_failed_job_ends_its_mlflow_run_failed(
    api: Api, tmp_path: Path, model_cache: Path
) -> None:
    from mlflow.tracking import MlflowClient

    spec = recipe_spec(_corpus(tmp_path / "corpus.jsonl"), max_steps=1, report_to=["mlflow"])
    spec["training_dataset"].update(format="text", min_examples=1000)  # fails before the model
    created = api.client.post("/jobs", json=spec)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    home = tmp_path / "home"
    settings = Settings(home=home, database_url=api.db_url, model_cache=model_cache)
    assert run_job(job_id, settings, worker="w") == JobStatus.failed
    job = api.client.get(f"/jobs/{job_id}").json()
    assert job["error"]["code"] == "dataset_too_small"
    where = job["tracking"]["mlflow"]
    run = MlflowClient(tracking_uri=where["tracking_uri"]).get_run(where["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["medtune.job_id"] == job_id
    assert not (home / "jobs" / job_id / "tensorboard").exists()  # report_to: mlflow only


@pytest.mark.slow
def test_a_text_job_trains_every_token_and_reports_to_every_tracker(
    api: Api, tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    spec = recipe_spec(
        _corpus(tmp_path / "corpus.jsonl"),
        max_steps=3,
        save_steps=0,
        packing=True,
        report_to=["tensorboard", "mlflow", "wandb"],
    )
    spec["training_dataset"].update(format="text", validation_share=0.2, min_examples=8)
    spec["model_config"]["max_seq_length"] = 64  # the longer documents become windows
    created = api.client.post("/jobs", json=spec)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    home = tmp_path / "home"
    settings = Settings(home=home, database_url=api.db_url, model_cache=model_cache)
    assert run_job(job_id, settings, worker="w") == JobStatus.succeeded
    job = api.client.get(f"/jobs/{job_id}").json()

    stats = job["dataset_stats"]
    assert stats["format"] == "text" and stats["trained_token_share"] == 1.0
    assert stats["truncated"] == 0 and stats["examples"] > 20  # windows, not cut documents
    rows = api.client.get(f"/jobs/{job_id}/metrics").json()["data"]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # step 0: held-out loss before training

    # MLflow: every number of every row at its step, the masked spec, the adapter, FINISHED.
    where = job["tracking"]["mlflow"]
    assert where["tracking_uri"] == f"sqlite:///{(home / 'mlflow' / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=where["tracking_uri"])
    run = client.get_run(where["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["medtune.job_id"] == job_id
    assert run.data.params["training_dataset.format"] == "text"
    for name in ("loss", "eval_loss", "learning_rate", "tokens_per_second", "memory_mb"):
        logged = {r["step"]: r[name] for r in rows if r.get(name) is not None}
        history = client.get_metric_history(run.info.run_id, name)
        assert {m.step: m.value for m in history} == pytest.approx(logged), name
        assert len(history) == len(logged), name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts

    # W&B offline: the run's file in the job folder holds the same rows.
    wandb = job["tracking"]["wandb"]
    assert wandb["mode"] == "offline" and wandb["run_id"] == job_id
    [file] = Path(wandb["dir"]).glob("run-*.wandb")
    deadline = time.monotonic() + 30
    while (history := _wandb_history(file)) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert history is not None
    assert [h["_step"] for h in history] == [0, 1, 2, 3]
    assert [h.get("loss") for h in history] == pytest.approx([r["loss"] for r in rows])
    # TensorBoard, still asked for, still written.
    assert list((home / "jobs" / job_id / "tensorboard").glob("events.out.tfevents.*"))

    shown = show_text(job)
    assert f"mlflow    run {where['run_id']} at {where['tracking_uri']}" in shown
    assert f"wandb     run {job_id} (offline) at {wandb['dir']}" in shown
    assert not [n for n in job["notes"] if n.startswith(("mlflow", "wandb"))], job["notes"]
