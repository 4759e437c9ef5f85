"""Dependencies injected into routes, overridable in tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends
from sqlmodel import Session

from core.db import get_engine
from core.queue import make_celery
from core.settings import Settings, get_settings


def get_session(settings: Annotated[Settings, Depends(get_settings)]) -> Iterator[Session]:
    with Session(get_engine(settings.db_url), expire_on_commit=False) as session:
        yield session


_queues: dict[tuple[str, str], Any] = {}


def get_queue(settings: Annotated[Settings, Depends(get_settings)]) -> Any:
    """One Celery client per broker/backend pair; it only sends tasks by name."""
    key = (settings.celery_broker_url, settings.celery_result_backend)
    if key not in _queues:
        _queues[key] = make_celery(settings)
    return _queues[key]


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
QueueDep = Annotated[Any, Depends(get_queue)]
