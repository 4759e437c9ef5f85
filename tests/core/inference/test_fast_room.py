"""Room kept for training on the inference worker's card (issue #14).

A training job's reservation is held from its warm message until its own worker says it ended;
messages about other jobs (their base, their adapter, another card) leave it alone, and a
standing reservation (MEDTUNE_INFER_PRELOAD) is never clobbered. On the CPU: the real engine on
SmolLM2 with the card's memory stood in for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import core.inference.warm as warm_module
from core.inference.engine import InferenceEngine
from core.inference.reserve import Reservations
from core.inference.warm import freed, send_freed, warm, warm_kwargs
from core.memory import GIB
from core.queue import FREED_TASK, INFER_QUEUE, celery_config
from core.settings import Settings
from core.spec import JobSpec
from tests.core.inference.test_inference import BASE

T4 = (int(9.2 * GIB), 15 * GIB)  # a T4 holding Unsloth's 4-bit 8B: a 4-bit copy fits beside


def _training(job_id: str, gib: float, *, device: str = "GPU-a", worker: str = "w1") -> dict:
    return {"device": device, "gib": gib, "job_id": job_id, "worker": worker}


# --- reservations -------------------------------------------------------------------------------


def test_reservations_are_kept_per_owner_and_released_only_by_it() -> None:
    held = Reservations()
    held.hold("A", 6 * GIB, worker="w1")
    held.hold("B", 2 * GIB, worker="w2")  # another training worker on the same card
    assert held.total == 8 * GIB
    assert not held.release("C")  # a job that reserved nothing releases nothing
    assert held.release("B") and held.total == 6 * GIB
    assert not held.release("B")
    # A preload's standing room for a job that may come: a running job fills it, not adds to it.
    held.stand("preload", 7 * GIB)
    assert held.total == 7 * GIB
    held.hold("D", 3 * GIB, worker="w2")
    assert held.total == 9 * GIB
    # One process trains one job at a time: its next job's reservation replaces its last one
    # (left behind if the message that ended it was lost); other workers' jobs stay.
    held.hold("E", 5 * GIB, worker="w1")
    assert sorted(held.owners()) == ["D", "E", "preload"] and held.total == 8 * GIB
    assert held.release("D") and held.release("E") and held.total == 7 * GIB


@pytest.fixture
def engine(model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The real engine with its base loaded on the CPU, then run as if on card GPU-a: warm
    messages reserve, fast builds plan against a stood-in card (a T4 with its base loaded)."""
    monkeypatch.setattr(warm_module, "cuda_device_uuid", lambda: "GPU-a")
    engine = InferenceEngine(models_dir=model_cache, max_batch=1)  # fast paths enabled
    engine.fast.memory = lambda: T4
    engine.warm(BASE, load_in_4bit=False).result()  # the base as the CPU loads it
    engine._cuda = True
    yield engine
    engine._cuda = False


def test_a_jobs_reservation_survives_warm_messages_for_other_jobs(engine: Any) -> None:
    """The review's finding: the adapter message of any job (it carries no training) set the
    shared reservation back to 0 while job A still trained on the card."""
    base = {"base_model": BASE, "load_in_4bit": False}
    assert warm(engine, **base, training=_training("A", 6.8))["warmed"]
    held = int(6.8 * GIB)
    assert engine.fast.reserved == held
    # Job B trains on another card, then its adapter is saved: neither touches A's room.
    warm(engine, **base, training=_training("B", 4.0, device="GPU-b", worker="w2"))
    assert engine.fast.reserved == held
    warm(engine, **base, adapter_name="B", training=None)
    assert engine.fast.reserved == held
    # Job C trains on this card from another worker: both are kept.
    warm(engine, **base, training=_training("C", 2.0, worker="w2"))
    assert engine.fast.reserved == held + 2 * GIB
    # Only its owner's end releases a reservation.
    assert freed(engine, job_id="B", device="GPU-b")["released"] is False
    assert engine.fast.reserved == held + 2 * GIB
    assert freed(engine, job_id="C", device="GPU-a")["released"] is True
    assert engine.fast.reserved == held
    assert freed(engine, job_id="A", device="GPU-a")["released"] is True
    assert engine.fast.reserved == 0


def test_a_preloads_standing_room_is_not_clobbered_by_jobs(engine: Any) -> None:
    base = {"base_model": BASE, "load_in_4bit": False}
    warm(engine, **base, training={"gib": 6.8})  # what preload sends: no job, a recipe's room
    warm(engine, **base, training=_training("A", 2.0))
    warm(engine, **base, adapter_name="A", training=None)
    assert engine.fast.reserved == int(6.8 * GIB)
    freed(engine, job_id="A", device="GPU-a")
    assert engine.fast.reserved == int(6.8 * GIB)


def test_the_warm_message_names_the_process_that_trains() -> None:
    spec = JobSpec.model_validate({"model_config": {"base_model": BASE}})
    training = warm_kwargs(spec, job_id="j1", training_gib=6.8)["training"]
    assert training["job_id"] == "j1" and training["worker"].endswith(f":{os.getpid()}")


# --- the training worker's end-of-job message ----------------------------------------------------


class _Queue:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send_task(self, name: str, **kwargs: Any) -> None:
        self.sent.append({"name": name, **kwargs})


def test_send_freed_goes_to_the_inference_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    queue = _Queue()
    monkeypatch.setattr(warm_module, "_sender", lambda settings: queue)
    send_freed(Settings(infer_warm=False), job_id="j1", why="x")
    assert queue.sent == []
    send_freed(Settings(), job_id="j1", why="training job j1 ended")
    [sent] = queue.sent
    assert sent["name"] == FREED_TASK and sent["queue"] == INFER_QUEUE
    assert sent["kwargs"]["job_id"] == "j1" and sent["kwargs"]["why"] == "training job j1 ended"
    assert celery_config(Settings())["task_routes"][FREED_TASK] == {"queue": INFER_QUEUE}

    def broken(settings: Any) -> Any:
        raise ConnectionError("broker down")

    monkeypatch.setattr(warm_module, "_sender", broken)
    send_freed(Settings(), job_id="j1", why="x")  # logged, never raised into the job


def test_a_failed_job_still_releases_its_reservation(
    tmp_path: Path, sqlite_url: str, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that fails (or is cancelled) never sends its adapter: its end message does."""
    from core.pipeline import run_job
    from core.store import jobs
    from core.store.db import session_scope
    from core.store.models import JobStatus
    from tests.helpers import recipe_spec

    queue = _Queue()
    monkeypatch.setattr(warm_module, "_sender", lambda settings: queue)
    spec = recipe_spec("sample:medical_qa", max_steps=1)
    spec["model_config"] = {**spec["model_config"], "base_model": str(tmp_path / "missing")}
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, JobSpec.model_validate(spec)).id
    settings = Settings(home=tmp_path, database_url=sqlite_url, model_cache=model_cache)
    assert run_job(job_id, settings, worker="w") == JobStatus.failed
    freed_messages = [m for m in queue.sent if m["name"] == FREED_TASK]
    assert [m["kwargs"]["job_id"] for m in freed_messages] == [job_id]


def test_the_worker_task_releases_and_never_raises(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import tasks

    monkeypatch.setattr(tasks, "_engine", lambda: engine)
    engine.fast.reserve("j1", GIB)
    assert tasks.memory_freed_task(job_id="j1", device="GPU-a", why="x")["released"] is True
    assert engine.fast.reserved == 0

    def broken() -> Any:
        raise RuntimeError("no engine")

    monkeypatch.setattr(tasks, "_engine", broken)
    assert tasks.memory_freed_task(job_id="j1") == {"released": False}
