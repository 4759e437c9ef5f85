"""`medtune up` runs an inference worker beside a training worker: it must not take every CPU."""

from __future__ import annotations

import pytest

import core.settings
from cli.main import shared_infer_env
from core.settings import Settings


@pytest.fixture
def six_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core.settings.os, "sched_getaffinity", lambda _: {0, 1, 2, 3, 4, 5})


def test_the_inference_worker_beside_training_gets_half_the_cpus(six_cpus: None) -> None:
    settings = Settings(infer_threads=0)
    assert settings.llama_threads(inference_only=True) == 6  # what it would take alone
    env = shared_infer_env(settings)
    assert env is not None and env["MEDTUNE_INFER_THREADS"] == "3"


def test_an_operators_thread_count_is_kept(six_cpus: None) -> None:
    assert shared_infer_env(Settings(infer_threads=5)) is None
