"""The API on a real port (uvicorn in a thread) over a SQLite store and a fake queue: what a
browser or the CLI talks to in tests that need no worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from api.deps import get_queue
from api.main import create_app
from core.inference.stream import channel_for
from core.settings import Settings, get_settings
from tests.api.in_process import FakeQueue
from tests.conftest import free_port


@contextmanager
def serve(db_url: str, home: Path, queue: FakeQueue | None = None) -> Iterator[str]:
    """Yield the base URL of an API with auth off; ``queue`` answers /infer as a worker would."""
    app = create_app()
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, database_url=db_url, home=home, auth="disabled"
    )
    queue = queue or FakeQueue()
    queue.channel = channel_for(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    app.dependency_overrides[get_queue] = lambda: queue
    port = free_port()
    running = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not running.started:
        assert time.monotonic() < deadline, "the API did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        running.should_exit = True
        thread.join(timeout=10)
