"""The whole path on real Postgres, real Redis, a real Celery worker and the real SmolLM2."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import Stack
from tests.helpers import recipe_spec, sse, tiny_dataset, wait_status, wait_steps

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_job(pg_redis_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict:
    data = tiny_dataset(tmp_path_factory.mktemp("data") / "tiny.jsonl")
    with pg_redis_stack.client() as client:
        created = client.post("/jobs", json=recipe_spec(data))
        assert created.status_code == 201, created.text
        job = created.json()
        # The shared worker is idle and may claim the job before the API has answered.
        assert job["status"] in ("queued", "running")
        # Poll metrics while it trains: rows appear before the job ends.
        seen_live = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            page = client.get(f"/jobs/{job['id']}/metrics").json()
            if page["status"] == "running" and page["data"]:
                seen_live.append(page["data"][-1]["step"])
            if page["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.2)
        final = wait_status(client, job["id"], {"succeeded", "failed", "cancelled"})
    assert final["status"] == "succeeded", pg_redis_stack.tail_logs() + str(final)
    return {"job": final, "seen_live": seen_live}


def test_job_trains_and_reports_metrics(pg_redis_stack: Stack, finished_job: dict) -> None:
    job = finished_job["job"]
    assert finished_job["seen_live"], "no metric row was visible while the job was running"
    assert job["steps_done"] == job["steps_total"] == 4
    assert job["stage"] is None and job["finished_at"] and job["started_at"]
    assert job["engine"].startswith("transformers+peft")
    # The recipe's T4 settings are adapted on a CPU worker, and the job says how.
    assert any("load_in_4bit" in n for n in job["notes"])
    assert any("adamw_8bit" in n for n in job["notes"])
    assert job["dataset_stats"]["examples"] == 8 and job["dataset_stats"]["trained_tokens"] > 0
    with pg_redis_stack.client() as client:
        page = client.get(f"/jobs/{job['id']}/metrics", params={"limit": 3}).json()
        assert [r["step"] for r in page["data"]] == [1, 2, 3] and page["has_more"]
        rest = client.get(
            f"/jobs/{job['id']}/metrics", params={"after_step": page["last_step"]}
        ).json()
        assert [r["step"] for r in rest["data"]] == [4] and not rest["has_more"]
    for row in page["data"] + rest["data"]:
        assert math.isfinite(row["loss"]) and row["loss"] > 0
        assert row["tokens_per_second"] > 0 and row["memory_mb"] > 0
        assert row["learning_rate"] is not None and row["grad_norm"] is not None


def test_adapter_weights_moved_from_init(finished_job: dict) -> None:
    adapter = Path(finished_job["job"]["artifacts"]["adapter"])
    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    # peft initialises every lora_B to zero: a trained adapter has moved them.
    assert len(lora_b) == 30 * 7  # SmolLM2-135M: 30 layers x 7 projections
    assert all(v.abs().sum() > 0 for v in lora_b.values())
    assert (adapter / "tokenizer_config.json").is_file()


def test_sse_replays_metrics_and_resumes(pg_redis_stack: Stack, finished_job: dict) -> None:
    job_id = finished_job["job"]["id"]
    with pg_redis_stack.client() as client:
        events = list(sse(client, f"/jobs/{job_id}/events"))
        metric_ids = [i for i, e, _ in events if e == "metric"]
        assert metric_ids == ["1", "2", "3", "4"]
        assert events[-1][1] == "end" and events[-1][2]["status"] == "succeeded"
        resumed = list(sse(client, f"/jobs/{job_id}/events", headers={"Last-Event-ID": "2"}))
        assert [i for i, e, _ in resumed if e == "metric"] == ["3", "4"]


def test_infer_answers_with_adapter_and_base(pg_redis_stack: Stack, finished_job: dict) -> None:
    job_id = finished_job["job"]["id"]
    with pg_redis_stack.client() as client:
        tuned = client.post(
            "/infer",
            json={
                "job_id": job_id,
                "max_new_tokens": 40,
                "question": "What causes iron deficiency anemia?",
            },
        )
        assert tuned.status_code == 200, tuned.text
        body = tuned.json()
        assert body["adapter"] is True and body["model"] == "smollm2-medical-test"
        assert body["answer"].strip() and 0 < body["usage"]["completion_tokens"] <= 40
        base = client.post(
            "/infer",
            json={
                "job_id": job_id,
                "use_adapter": False,
                "max_new_tokens": 40,
                "messages": [{"role": "user", "content": "Hi"}],
            },
        )
        assert base.status_code == 200, base.text
        assert base.json()["adapter"] is False


def test_cancel_running_job_stops_at_step_boundary(pg_redis_stack: Stack, tmp_path: Path) -> None:
    data = tiny_dataset(tmp_path / "tiny.jsonl")
    with pg_redis_stack.client() as client:
        job = client.post("/jobs", json=recipe_spec(data, max_steps=400)).json()
        wait_steps(client, job["id"], 1)
        cancelled = client.post(f"/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["cancel_requested"]
        final = wait_status(client, job["id"], {"cancelled", "failed", "succeeded"}, 120)
        assert final["status"] == "cancelled", final
        assert 1 <= final["steps_done"] < 400
        # Cancel saves a checkpoint at the step it stopped on, and the adapter beside it.
        saved = client.get(f"/jobs/{job['id']}/checkpoints").json()["data"]
        assert saved and saved[-1]["step"] == final["steps_done"]
        assert Path(final["artifacts"]["adapter"], "adapter_model.safetensors").is_file()
        again = client.post(f"/jobs/{job['id']}/cancel")
        assert again.status_code == 409
        assert again.json()["code"] == "job_not_cancellable"
        refused = client.post("/infer", json={"job_id": job["id"], "question": "Hello?"})
        assert refused.status_code == 409 and refused.json()["code"] == "job_not_ready"
