"""Room kept for training on the inference worker's card, and fast builds it refused (issue #14).

A training job's reservation is held from its warm message until its own worker says it ended;
messages about other jobs (their base, their adapter, another card) leave it alone, and a
standing reservation (MEDTUNE_INFER_PRELOAD) is never clobbered. A fast build refused for room
is planned once more when memory frees (a job ended, an export did), once per event, while the
model thread keeps answering. On the CPU: the real engine on SmolLM2 with the card's memory and
the builders stood in for.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

import core.inference.warm as warm_module
from core.inference.engine import InferenceEngine
from core.inference.fast import Fast
from core.inference.fast_multi import MultiFast
from core.inference.reserve import Reservations
from core.inference.warm import freed, send_freed, warm, warm_kwargs
from core.memory import GIB
from core.queue import FREED_TASK, INFER_QUEUE, celery_config
from core.settings import Settings
from core.spec import JobSpec
from tests.core.inference.test_fast_path import _Decoder, _MultiDecoder, _paths, llama8b_dir
from tests.core.inference.test_inference import BASE, QUESTIONS, ask, make_adapter

__all__ = ["llama8b_dir"]  # the fixture, shared with test_fast_path

T4 = (int(9.2 * GIB), 15 * GIB)  # a T4 holding Unsloth's 4-bit 8B: a 4-bit copy fits beside
H200 = (130 * GIB, 140 * GIB)


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


def test_a_hold_that_arrives_after_its_jobs_release_is_ignored() -> None:
    """The inference worker's task pool may run a job's warm message after its end message (a
    job that failed in its first steps): that reservation would never be released."""
    held = Reservations()
    assert not held.release("F")  # the end message ran first
    held.hold("F", 6 * GIB, worker="w1")
    assert held.total == 0 and held.owners() == []
    held.hold("G", 2 * GIB, worker="w1")  # the worker's next job still reserves
    assert held.total == 2 * GIB


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
    assert tasks.memory_freed_task(job_id="j1") == {"released": False, "queued": 0}


# --- builds refused for room are planned again when memory frees --------------------------------


def test_a_build_refused_for_room_is_queued_again_once_when_the_job_ends(
    llama8b_dir: Path,
) -> None:
    paths = _paths(T4)
    paths.reserve("A", int(6.8 * GIB), worker="w1")
    base, adapter = str(llama8b_dir), "/jobs/x/adapter"
    assert not paths.want(base, adapter, None)
    assert "kept for training" in paths.notes[adapter]
    assert not paths.want(base, adapter, None)  # later answers do not retry it
    assert paths.built == []  # type: ignore[attr-defined]
    assert paths.release("A")
    assert paths.retry("job A ended") == 1
    assert paths.built == ["lora_4bit:adapter"]  # type: ignore[attr-defined]
    assert paths.get(adapter) is not None and adapter not in paths.notes
    assert paths.retry("job B ended") == 0  # built: nothing left to retry
    assert paths.built == ["lora_4bit:adapter"]  # type: ignore[attr-defined]


def test_a_build_refused_again_waits_for_the_next_time_memory_frees(llama8b_dir: Path) -> None:
    memory = [(2 * GIB, 15 * GIB)]  # nothing fits
    paths = _paths((0, 0))
    paths.memory = lambda: memory[0]
    base, adapter = str(llama8b_dir), "/jobs/x/adapter"
    assert not paths.want(base, adapter, None)
    assert paths.retry("an export ended") == 0  # still no room: refused again, once
    assert "no fast path" in paths.notes[adapter]
    for _ in range(3):
        assert not paths.want(base, adapter, None)  # no loop: answers do not plan it again
    memory[0] = T4
    assert paths.retry("job A ended") == 1
    assert paths.built == ["lora_4bit:adapter"]  # type: ignore[attr-defined]


def test_failures_and_unsized_bases_are_not_retried(llama8b_dir: Path, tmp_path: Path) -> None:
    paths = _paths(H200)

    def fail(*args: Any, **kwargs: Any) -> Fast:
        raise RuntimeError("no bitsandbytes")

    paths.builders = {"merged_bf16": fail}
    assert paths.want(str(llama8b_dir), "/jobs/c/adapter", None)
    assert "no bitsandbytes" in paths.notes["/jobs/c/adapter"]
    unsized = tmp_path / "unsized"  # a base with no config.json to size it by
    unsized.mkdir()
    assert not paths.want(str(unsized), "/jobs/d/adapter", None)
    assert paths.retry("job A ended") == 0
    assert "no bitsandbytes" in paths.notes["/jobs/c/adapter"]
    assert "config.json" in paths.notes["/jobs/d/adapter"]


def test_a_multi_lora_build_refused_for_room_is_queued_again(llama8b_dir: Path) -> None:
    memory = [T4]
    built: list[str] = []

    def build_multi(base: str, tokenizer: Any, *, four_bit: bool, rows: int) -> MultiFast:
        built.append("multi_4bit" if four_bit else "multi_bf16")
        return MultiFast(_MultiDecoder(), "multi_4bit" if four_bit else "multi_bf16")

    paths = _paths((0, 0), multi_builder=build_multi)
    paths.memory = lambda: memory[0]
    base = str(llama8b_dir)
    assert paths.want(base, "/jobs/a/adapter", None)  # its own 4-bit model fits
    memory[0] = (int(4 * GIB), 15 * GIB)  # which took the room
    assert not paths.want(base, "/jobs/b/adapter", None)  # the second adapter: multi-LoRA
    assert f"multi:{base}" in paths.notes and built == []
    memory[0] = H200
    assert paths.retry("an export ended") >= 1
    assert built == ["multi_bf16"] and paths.multi(base) is not None
    assert paths.serves(base, "/jobs/b/adapter") is not None


def test_answers_keep_flowing_while_the_retried_build_runs(
    engine: Any, model_dir: Path, tmp_path: Path
) -> None:
    """The job's first answer comes from the model thread and its fast build is refused for the
    job's room; the job ends, the build is queued on the lane (once), and while it builds the
    model thread still answers; then the adapter's requests switch to the fast model."""
    adapter = make_adapter(model_dir, tmp_path / "job_a", seed=3)
    started, go = threading.Event(), threading.Event()
    built: list[str] = []

    def build(base: str, adapter_dir: str, tokenizer: Any, *, cache_tokens: int) -> Fast:
        started.set()
        assert go.wait(60)
        built.append(Path(adapter_dir).name)
        return Fast(_Decoder(), "lora_4bit")

    engine.fast.builders = {"lora_4bit": build}
    engine.fast.memory = lambda: (3 * GIB, 15 * GIB)  # SmolLM2's fits, beside 6.8 GiB it does not
    common = {"base_model": BASE, "load_in_4bit": False, "max_new_tokens": 4}
    warm(engine, base_model=BASE, load_in_4bit=False, training=_training("job_a", 6.8))
    first = engine.answer(**common, messages=ask(QUESTIONS[0]), adapter_dir=str(adapter))
    assert first["backend"] == "transformers"
    assert "kept for training" in engine.fast.notes[str(adapter)] and engine.fast.builds == []
    done = freed(engine, job_id="job_a", device="GPU-a", why="training job job_a ended")
    assert done == {"released": True, "queued": 1}
    assert started.wait(60)
    # The lane builds; the model thread answers meanwhile.
    during = engine.answer(**common, messages=ask(QUESTIONS[1]), adapter_dir=str(adapter))
    assert during["backend"] == "transformers" and during["answer"]
    go.set()
    for future in engine.fast.builds:
        future.result()
    assert built == ["job_a"]
    after = engine.answer(**common, messages=ask(QUESTIONS[1]), adapter_dir=str(adapter))
    assert after["backend"] == "cuda_static" and after["fast_path"] == "lora_4bit"
    assert freed(engine, why="an export ended")["queued"] == 0 and built == ["job_a"]


def test_a_later_export_frees_its_model_and_says_so(
    tmp_path: Path, sqlite_url: str, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later export releases the kept base and loads its own model: once it is done, that
    memory goes back to the card and the inference workers hear of it."""
    from core.export import run
    from core.store import jobs
    from core.store.db import session_scope
    from core.store.models import JobStatus
    from core.training import base_cache
    from tests.helpers import recipe_spec
    from worker import tasks

    events: list[str] = []
    monkeypatch.setattr(base_cache, "release", lambda reason="": events.append("release"))
    monkeypatch.setattr(base_cache, "free_memory", lambda: events.append("free"))
    monkeypatch.setattr(run, "_load_finished", lambda *a: events.append("load") or object())
    monkeypatch.setattr(run, "export_all", lambda *a, **k: events.append("export") or {})
    queue = _Queue()
    monkeypatch.setattr(warm_module, "_sender", lambda settings: queue)
    settings = Settings(home=tmp_path, database_url=sqlite_url, model_cache=model_cache)
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    folder = tmp_path / "job"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, JobSpec.model_validate(recipe_spec("sample:medical_qa"))).id
        assert jobs.claim(s, job_id, worker="w")
        jobs.finish(
            s,
            job_id,
            JobStatus.succeeded,
            artifacts_dir=str(folder),
            adapter_dir=str(folder / "adapter"),
        )
    done = tasks.export_task(job_id, formats=["merged_16bit"], gguf_quantizations=[])
    assert "error" not in done, done
    assert events == ["release", "load", "export", "free"]
    [sent] = queue.sent
    assert sent["name"] == FREED_TASK and sent["kwargs"]["job_id"] is None
    assert "export" in sent["kwargs"]["why"]
