"""POST /jobs routes by estimated GPU memory to announced workers, or refuses with the estimate."""

from __future__ import annotations

from core.routing import announce
from core.store.db import session_scope
from tests.api.in_process import Api, assert_problem
from tests.helpers import recipe_spec

LLAMA3_RECIPE = {
    "model_config": {"base_model": "unsloth/llama-3-8b-Instruct-bnb-4bit", "max_seq_length": 2048},
    "training_dataset": {"name": "sample:medical_qa"},
}


def test_job_goes_to_the_smallest_gpu_that_holds_it(api: Api) -> None:
    with session_scope(api.db_url) as s:
        announce(
            s, name="t4@a", queue="medtune.train.gpu14", gpu_name="Tesla T4", gpu_memory_gib=14.6
        )
        announce(
            s, name="h200@b", queue="medtune.train.gpu139", gpu_name="H200", gpu_memory_gib=139.8
        )
    created = api.client.post("/jobs", json=LLAMA3_RECIPE)
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["queue"] == "medtune.train.gpu14" and 6 < job["estimated_gpu_memory_gib"] < 8
    (sent,) = api.queue.calls
    assert sent.args == [job["id"]] and sent.options["queue"] == "medtune.train.gpu14"


def test_job_no_worker_can_hold_is_refused_and_not_stored(api: Api) -> None:
    with session_scope(api.db_url) as s:
        announce(
            s, name="t4@a", queue="medtune.train.gpu14", gpu_name="Tesla T4", gpu_memory_gib=14.6
        )
    before = api.snapshot()
    spec = {**LLAMA3_RECIPE, "training_config": {"per_device_train_batch_size": 64}}
    body = assert_problem(
        api.client.post("/jobs", json=spec),
        422,
        "gpu_memory_exceeded",
        "training_config.per_device_train_batch_size",
    )
    assert "14.6 GiB" in body["detail"]
    assert api.snapshot() == before and not api.queue.calls


def test_cpu_only_fleet_uses_the_default_queue(api: Api) -> None:
    created = api.client.post("/jobs", json=recipe_spec("sample:medical_qa"))
    assert created.status_code == 201
    assert created.json()["queue"] == "medtune.train"
