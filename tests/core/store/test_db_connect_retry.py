"""Workers wait for a database that is down (core.store.db.connect_retry); the API does not."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from core.queue import celery_config
from core.settings import Settings
from core.store import db
from tests.conftest import free_port


@pytest.fixture
def down_url() -> Iterator[str]:
    """A Postgres URL on a port nothing listens on."""
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/medtune"
    yield url
    db.connect_retry(0)
    db.get_engine(url).dispose()


def _connect(url: str) -> None:
    with db.get_engine(url).connect() as conn:
        conn.execute(text("SELECT 1"))


def test_without_retry_a_down_database_fails_at_once(down_url: str) -> None:
    started = time.monotonic()
    with pytest.raises(OperationalError):
        _connect(down_url)
    assert time.monotonic() - started < 1


def test_with_retry_it_backs_off_until_the_bound(
    down_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    db.connect_retry(1.5)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="core.store.db"), pytest.raises(OperationalError):
        _connect(down_url)
    waited = time.monotonic() - started
    pauses = [r for r in caplog.records if "database unreachable" in r.getMessage()]
    # 0.25 + 0.5 s of pauses fit in 1.5 s; the next (1 s) would not, so it gives up.
    assert len(pauses) == 2 and 0.7 < waited < 1.5


def test_short_visibility_timeouts_get_sweeps_as_often() -> None:
    def options(**settings: object) -> dict[str, object]:
        config = Settings(_env_file=None, broker_url="redis://127.0.0.1:1/0", **settings)  # type: ignore[call-arg]
        return celery_config(config)["broker_transport_options"]  # type: ignore[no-any-return]

    assert options() == {"visibility_timeout": 24 * 3600.0}
    assert options(visibility_timeout_s=2) == {
        "visibility_timeout": 2,
        "unacked_restore_interval": 2,
        "unacked_restore_throttle": 1,
    }
