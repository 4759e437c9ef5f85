"""How many threads llama.cpp gets: all usable CPUs on an inference-only worker, half of them
elsewhere, MEDTUNE_INFER_THREADS over both; and how a worker knows its queues."""

from __future__ import annotations

from collections import Counter

import pytest

import core.settings
from core.inference.llamacpp import LlamaCppBackend
from core.queue import INFER_QUEUE, TRAIN_QUEUE, make_celery, serves_only_inference
from core.settings import Settings, default_llama_threads, usable_cpus


@pytest.fixture
def six_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process may run on 6 CPUs (as under taskset or a cpuset), whatever the machine has."""
    monkeypatch.setattr(core.settings.os, "sched_getaffinity", lambda _: {0, 1, 2, 3, 4, 5})


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg, arg-type]


@pytest.mark.parametrize(
    ("cpus", "inference_only", "threads"),
    [(8, True, 8), (8, False, 4), (2, True, 2), (2, False, 1), (3, False, 1), (1, False, 1)],
)
def test_the_default_follows_the_role(cpus: int, inference_only: bool, threads: int) -> None:
    assert default_llama_threads(inference_only=inference_only, cpus=cpus) == threads


def test_the_usable_cpus_are_the_affinity(six_cpus: None) -> None:
    assert usable_cpus() == 6
    assert settings().llama_threads(inference_only=True) == 6
    assert settings().llama_threads(inference_only=False) == 3
    assert LlamaCppBackend(loads=Counter()).n_threads == 3  # no count given: half


def test_the_setting_wins_over_the_role(six_cpus: None) -> None:
    pinned = settings(infer_threads=2)
    assert pinned.llama_threads(inference_only=True) == 2
    assert pinned.llama_threads(inference_only=False) == 2


@pytest.mark.parametrize(
    ("queues", "only"),
    [
        ({INFER_QUEUE}, True),
        ({INFER_QUEUE, TRAIN_QUEUE}, False),
        ({TRAIN_QUEUE}, False),
        ({INFER_QUEUE, f"{TRAIN_QUEUE}.gpu80"}, False),
        (set(), False),
    ],
)
def test_only_the_inference_queue_is_inference_only(queues: set[str], only: bool) -> None:
    assert serves_only_inference(queues) is only


def test_a_worker_reads_the_queues_its_q_option_selected() -> None:
    from worker.celery_app import consumed_queues

    app = make_celery(settings(broker_url="redis://127.0.0.1:1/0"))
    assert TRAIN_QUEUE in consumed_queues(app)  # no -Q: the default queue, training's
    app.amqp.queues.select([INFER_QUEUE])  # what `celery worker -Q medtune.infer` does
    assert consumed_queues(app) == {INFER_QUEUE}
    app.amqp.queues.select([TRAIN_QUEUE, INFER_QUEUE])
    assert consumed_queues(app) == {TRAIN_QUEUE, INFER_QUEUE}


def test_the_worker_gives_an_inference_only_engine_every_cpu(six_cpus: None) -> None:
    from worker.tasks import llama_threads

    assert llama_threads(settings(), {INFER_QUEUE}) == 6
    assert llama_threads(settings(), {TRAIN_QUEUE, INFER_QUEUE}) == 3
    assert llama_threads(settings(infer_threads=4), {INFER_QUEUE}) == 4
