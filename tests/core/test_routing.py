"""Routing by GPU memory: smallest card that fits, CPU queue without GPUs, refusal with numbers."""

from __future__ import annotations

from datetime import timedelta

import pytest

from core.routing import GpuMemoryExceeded, announce, gpu_queue, live_workers, route
from core.spec import JobSpec
from core.store.db import session_scope
from core.store.models import Worker, utcnow

LLAMA3 = JobSpec.model_validate({"model_config": {"max_seq_length": 2048}})  # recipe, 8B


def _gpu(name: str, gib: float) -> Worker:
    return Worker(name=name, queue=gpu_queue(gib), gpu_memory_gib=gib)


def test_smallest_card_that_holds_the_job_wins() -> None:
    queue, needed = route(LLAMA3, [_gpu("h200", 139.8), _gpu("t4", 14.6), _gpu("a10", 22.0)])
    assert needed is not None and 6 < needed.total_gib < 8
    assert queue == "medtune.train.gpu14"


def test_no_gpu_workers_means_the_cpu_queue() -> None:
    cpu = Worker(name="cpu", queue="medtune.train")
    assert route(LLAMA3, [cpu])[0] == "medtune.train"
    assert route(LLAMA3, [])[0] == "medtune.train"


def test_a_job_no_card_can_hold_is_refused_with_the_estimate() -> None:
    huge = LLAMA3.model_copy(
        update={"training": LLAMA3.training.model_copy(update={"per_device_train_batch_size": 64})}
    )
    with pytest.raises(GpuMemoryExceeded) as err:
        route(huge, [_gpu("t4", 14.6)])
    assert err.value.code == "gpu_memory_exceeded"
    assert "GiB of GPU memory" in err.value.detail and "14.6 GiB" in err.value.detail


def test_unknown_shape_goes_to_the_largest_card() -> None:
    odd = JobSpec.model_validate({"model_config": {"base_model": "someone/odd-model"}})
    assert route(odd, [_gpu("t4", 14.6), _gpu("h200", 139.8)]) == ("medtune.train.gpu139", None)


def test_workers_announce_and_go_stale(sqlite_url: str) -> None:
    with session_scope(sqlite_url) as s:
        announce(
            s,
            name="gpu0@host",
            queue="medtune.train.gpu14",
            gpu_name="Tesla T4",
            gpu_memory_gib=14.6,
        )
        announce(s, name="old@host", queue="medtune.train", gpu_name=None, gpu_memory_gib=None)
        stale = s.get(Worker, "old@host")
        assert stale is not None
        stale.last_seen = utcnow() - timedelta(hours=1)
        s.add(stale)
        s.commit()
        announce(
            s,
            name="gpu0@host",
            queue="medtune.train.gpu14",
            gpu_name="Tesla T4",
            gpu_memory_gib=14.6,
        )  # a heartbeat updates, never duplicates
        assert [w.name for w in live_workers(s)] == ["gpu0@host"]
