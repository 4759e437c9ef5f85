"""``medtune files upload|list|delete`` in a subprocess against a live HTTP API (uvicorn in a
thread, SQLite store, a fake queue: no worker is needed to store files)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from api.deps import get_queue
from api.main import create_app
from core.settings import Settings, get_settings
from tests.api.in_process import FakeQueue
from tests.cli.test_cli_client import medtune
from tests.conftest import free_port
from tests.helpers import recipe_spec, tiny_dataset


@pytest.fixture
def server(sqlite_url: str, tmp_path: Path) -> Iterator[str]:
    app = create_app()
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, database_url=sqlite_url, home=tmp_path / "home", auth="disabled"
    )
    app.dependency_overrides[get_settings] = lambda: settings
    app.dependency_overrides[get_queue] = lambda: FakeQueue()
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not running.started:
        assert time.monotonic() < deadline, "the API did not start"
        time.sleep(0.05)
    yield url
    running.should_exit = True
    thread.join(timeout=10)


def test_upload_list_delete(server: str, tmp_path: Path) -> None:
    data = tiny_dataset(tmp_path / "tiny.jsonl", rows=4)
    uploaded = medtune("files", "upload", str(data), url=server)
    assert uploaded.returncode == 0, uploaded.stderr
    file_id = uploaded.stdout.strip()  # the id alone on stdout, for FILE=$(medtune files upload)
    assert file_id.startswith("file-")
    assert "tiny.jsonl" in uploaded.stderr and file_id in uploaded.stderr

    as_json = medtune("files", "upload", str(data), "--json", url=server)
    second = json.loads(as_json.stdout)
    assert second["bytes"] == data.stat().st_size and second["id"] != file_id

    listed = medtune("files", "list", url=server)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["ID", "BYTES", "PURPOSE", "CREATED", "(UTC)", "NAME"]
    assert [line.split()[0] for line in lines[1:]] == [second["id"], file_id]
    page = json.loads(
        medtune("files", "list", "--json", "--all", "--limit", "1", url=server).stdout
    )
    assert [f["id"] for f in page["data"]] == [second["id"], file_id] and not page["has_more"]

    deleted = medtune("files", "delete", second["id"], url=server)
    assert deleted.returncode == 0 and deleted.stdout.strip() == f"file {second['id']} deleted"
    again = medtune("files", "delete", second["id"], url=server)
    assert again.returncode == 2 and again.stderr.startswith("error file_not_found: ")


def test_a_retried_upload_with_a_key_is_the_same_file(server: str, tmp_path: Path) -> None:
    data = tiny_dataset(tmp_path / "tiny.jsonl", rows=2)
    ids = {
        medtune("files", "upload", str(data), "--idempotency-key", "k1", url=server).stdout.strip()
        for _ in range(2)
    }
    assert len(ids) == 1


def test_errors_are_exit_2_with_the_code(server: str, tmp_path: Path) -> None:
    missing = medtune("files", "upload", str(tmp_path / "nope.jsonl"), url=server)
    assert missing.returncode == 2 and missing.stderr.startswith("error file_not_found: ")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x00\x01")
    refused = medtune("files", "upload", str(binary), url=server)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error unsupported_file_type: ")

    # A file a queued job reads cannot be deleted; the error says which job.
    data = tiny_dataset(tmp_path / "tiny.jsonl", rows=2)
    file_id = medtune("files", "upload", str(data), url=server).stdout.strip()
    job = httpx.post(f"{server}/jobs", json=recipe_spec(file_id)).json()
    in_use = medtune("files", "delete", file_id, url=server)
    assert in_use.returncode == 2 and in_use.stderr.startswith("error file_in_use: ")
    assert job["id"] in in_use.stderr
