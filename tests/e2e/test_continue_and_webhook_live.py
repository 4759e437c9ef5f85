"""On a real worker (SmolLM2, CPU): job B continues job A's adapter and starts lower than A
did on the same data; A's webhook reaches a loopback receiver that fails twice first, signed;
B reports to MLflow's embedded store and W&B offline beside TensorBoard, every metric row at its
step; C, a continued-pretraining job on raw text, trains every token on the same worker.

The jobs run on the session's live stack (``pg_redis_stack``: Postgres, Redis, one worker that
keeps its base model loaded between jobs), which allows loopback webhook targets for this test.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.api.test_tracking_text_job import _corpus
from tests.conftest import Stack
from tests.core.test_webhooks import SECRET, Receiver, receiver, verify  # noqa: F401
from tests.core.training.test_tracking import _wandb_history
from tests.helpers import recipe_spec, tiny_dataset, wait_status

pytestmark = pytest.mark.slow


def first_loss(client: object, job_id: str) -> float:
    rows = client.get(f"/jobs/{job_id}/metrics").json()["data"]  # type: ignore[attr-defined]
    assert rows and rows[0]["step"] == 1, rows
    return float(rows[0]["loss"])


def assert_in_mlflow(job: dict, rows: list[dict]) -> None:
    """The worker's MLflow run of ``job``: FINISHED, tagged, each loss at its step, the adapter."""
    from mlflow.tracking import MlflowClient

    where = job["tracking"]["mlflow"]
    client = MlflowClient(tracking_uri=where["tracking_uri"])
    run = client.get_run(where["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["medtune.job_id"] == job["id"]
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx({r["step"]: r["loss"] for r in rows if r.get("loss")})
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts
    wandb = job["tracking"]["wandb"]
    assert wandb["mode"] == "offline" and wandb["run_id"] == job["id"]
    [file] = Path(wandb["dir"]).glob("run-*.wandb")
    logged = _wandb_history(file)
    assert logged is not None
    losses = [r["loss"] for r in rows if r.get("loss")]
    assert [h["loss"] for h in logged if h.get("loss")] == pytest.approx(losses)


def test_b_continues_a_and_a_webhook_arrives(
    tmp_path: Path,
    pg_redis_stack: Stack,
    receiver: Receiver,  # noqa: F811
) -> None:
    receiver.statuses = [500, 502]
    stack = pg_redis_stack
    data = tiny_dataset(tmp_path / "tiny.jsonl", rows=8)
    spec_a = recipe_spec(data, max_steps=4)
    spec_a["webhook"] = {"url": receiver.url, "secret": SECRET}
    with stack.client() as client:
        a = client.post("/jobs", json=spec_a)
        assert a.status_code == 201, a.text
        a_id = a.json()["id"]
        done = wait_status(client, a_id, {"succeeded", "failed", "cancelled"}, timeout_s=600)
        assert done["status"] == "succeeded", stack.tail_logs() + str(done)

        spec_b = recipe_spec(data, max_steps=2, report_to=["tensorboard", "mlflow", "wandb"])
        spec_b["model_config"]["init_adapter"] = a_id
        b = client.post("/jobs", json=spec_b)
        assert b.status_code == 201, b.text
        b_id = b.json()["id"]
        done_b = wait_status(client, b_id, {"succeeded", "failed", "cancelled"}, timeout_s=600)
        assert done_b["status"] == "succeeded", stack.tail_logs() + str(done_b)
        assert f"started from the adapter of job {a_id}" in done_b["notes"]
        loss_a, loss_b = first_loss(client, a_id), first_loss(client, b_id)
        assert loss_b < loss_a - 0.05, (loss_a, loss_b)
        rows_b = client.get(f"/jobs/{b_id}/metrics").json()["data"]

        spec_c = recipe_spec(_corpus(tmp_path / "corpus.jsonl"), max_steps=2, packing=True)
        spec_c["training_dataset"].update(format="text", min_examples=8)
        c = client.post("/jobs", json=spec_c)
        assert c.status_code == 201, c.text
        done_c = wait_status(
            client, c.json()["id"], {"succeeded", "failed", "cancelled"}, timeout_s=600
        )
        assert done_c["status"] == "succeeded", stack.tail_logs() + str(done_c)
        assert done_c["dataset_stats"]["format"] == "text"
        assert done_c["dataset_stats"]["trained_token_share"] == 1.0  # every token trained

        deadline = time.monotonic() + 60
        while (hook := client.get(f"/jobs/{a_id}").json()["webhook"])["state"] == "pending":
            assert time.monotonic() < deadline, hook
            time.sleep(0.3)
    assert hook["state"] == "delivered" and hook["attempts"] == 3, hook
    assert len(receiver.got) == 3
    for headers, body, received in receiver.got:
        verify(headers, body, SECRET, received)
        event = json.loads(body)
        assert event["type"] == "job.succeeded" and event["data"]["id"] == a_id
        assert event["data"]["steps_done"] == 4
    assert_in_mlflow(done_b, rows_b)
    # The job folder's copy of the spec keeps no secret: it is shared with the artifacts.
    stored = json.loads((stack.home / "jobs" / a_id / "spec.json").read_text())
    assert stored["webhook"]["secret"] != SECRET and SECRET not in json.dumps(stored)
