"""A CUDA worker imports Unsloth when it starts, not inside its first job (issue 13)."""

from __future__ import annotations

import sys
import types

import pytest

from worker import celery_app


def test_a_cpu_worker_imports_nothing_more() -> None:
    # This machine has no CUDA (and no Unsloth): the worker starts as before.
    assert celery_app.preload_unsloth() is False
    assert "unsloth" not in sys.modules


def test_a_cuda_worker_with_unsloth_imports_it_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("unsloth")
    fake.__spec__ = types.SimpleNamespace(name="unsloth")  # type: ignore[assignment]
    monkeypatch.setattr("importlib.util.find_spec", lambda name: fake.__spec__)
    monkeypatch.setattr(celery_app, "_gpu", lambda: ("Tesla T4", 15.0))
    monkeypatch.setitem(sys.modules, "unsloth", fake)
    imported = []
    real_import = __builtins__["__import__"] if isinstance(__builtins__, dict) else __import__

    def spy(name: str, *args: object, **kwargs: object) -> object:
        if name == "unsloth":
            imported.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", spy)
    assert celery_app.preload_unsloth() is True
    assert imported == ["unsloth"]


def test_a_cuda_worker_without_unsloth_starts_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    monkeypatch.setattr(celery_app, "_gpu", lambda: ("NVIDIA H200", 139.8))
    assert celery_app.preload_unsloth() is False
