"""Fixtures of the training tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def fresh_oom_injection() -> Iterator[None]:
    """An injected out-of-memory fires once per step per process (so a job's retry gets past
    it): each test starts with none fired, or a second test injecting at the same step would
    see no fault at all."""
    from core.training import sink_callback

    sink_callback._injected.clear()
    yield
    sink_callback._injected.clear()
