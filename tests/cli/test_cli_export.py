"""``medtune export``, ``jobs artifacts`` and ``artifacts download`` in a subprocess against a
live HTTP API (uvicorn in a thread, SQLite store). The queue stands in for the worker's export
task: it writes the manifest as core.export.run.run_export does (entries ``running``, then real
files with their sha256, then the job's notes), so --wait polls a manifest that really changes.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from api.deps import get_queue
from api.main import create_app
from core.export.formats import describe, manifest_keys, update_manifest
from core.queue import EXPORT_TASK
from core.settings import Settings, get_settings
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from tests.api.in_process import FakeQueue
from tests.cli.test_cli_client import medtune
from tests.conftest import free_port
from tests.helpers import recipe_spec


@dataclass
class ExportingQueue(FakeQueue):
    """Records tasks; an export task is carried out on a thread after ``delay_s``."""

    db_url: str = ""
    delay_s: float = 1.0
    fail: set[str] = field(default_factory=set)
    threads: list[threading.Thread] = field(default_factory=list)

    def send_task(self, name: str, args: list[Any] | None = None, **kw: Any) -> Any:
        result = super().send_task(name, args, **kw)
        if name == EXPORT_TASK:
            assert args is not None
            worker = threading.Thread(target=self._export, args=(args[0], kw["kwargs"]))
            worker.start()
            self.threads.append(worker)
        return result

    def _export(self, job_id: str, kwargs: dict[str, Any]) -> None:
        with session_scope(self.db_url) as s:
            job_dir = Path(jobs.get_job(s, job_id).artifacts_dir or "")
        keys = manifest_keys(kwargs["formats"], kwargs["gguf_quantizations"])
        time.sleep(self.delay_s / 2)
        update_manifest(job_dir, {k: {"status": "running"} for k in keys})
        time.sleep(self.delay_s / 2)
        entries: dict[str, Any] = {}
        for key in keys:
            if key in self.fail:
                message = "the merged weights do not fit"
                entries[key] = {
                    "status": "failed",
                    "error": {"code": f"export_{key}_failed", "message": message},
                }
                continue
            folder = job_dir / key
            folder.mkdir(exist_ok=True)
            (folder / f"model-{key}.bin").write_bytes(key.encode() * 1000)
            entries[key] = {
                "status": "ok",
                "folder": key,
                "files": describe(folder),
                "smoke_test": [],
            }
        update_manifest(job_dir, entries)
        with session_scope(self.db_url) as s:
            for key in keys:
                jobs.add_note(s, job_id, f"export {key}: {entries[key]['status']}")


@dataclass
class Server:
    url: str
    queue: ExportingQueue
    db_url: str
    home: Path


@pytest.fixture
def server(sqlite_url: str, tmp_path: Path) -> Iterator[Server]:
    app = create_app()
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, database_url=sqlite_url, home=tmp_path / "home", auth="disabled"
    )
    queue = ExportingQueue(db_url=sqlite_url)
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
    yield Server(f"http://127.0.0.1:{port}", queue, sqlite_url, tmp_path)
    for worker in queue.threads:
        worker.join(timeout=10)
    running.should_exit = True
    thread.join(timeout=10)


def _job(server: Server, *, succeeded: bool = True) -> str:
    created = httpx.post(f"{server.url}/jobs", json=recipe_spec("sample:medical_qa"))
    assert created.status_code == 201, created.text
    job_id = str(created.json()["id"])
    if not succeeded:
        return job_id
    adapter = server.home / job_id / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    with session_scope(server.db_url) as s:
        assert jobs.claim(s, job_id, worker="w")
        jobs.finish(
            s,
            job_id,
            JobStatus.succeeded,
            adapter_dir=str(adapter),
            artifacts_dir=str(adapter.parent),
        )
    return job_id


def test_export_queues_and_prints_what_was_asked(server: Server) -> None:
    job_id = _job(server)
    result = medtune(
        "export", job_id, "--format", "gguf", "lora", "--quantization", "q8_0", url=server.url
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"export of job {job_id} queued: lora, gguf_q8_0"
    sent = [c for c in server.queue.calls if c.name == EXPORT_TASK]
    assert [c.kwargs for c in sent] == [
        {"formats": ["gguf", "lora"], "gguf_quantizations": ["q8_0"], "push_to_hub": False}
    ]


def test_export_wait_prints_each_file_once_the_worker_is_done(server: Server) -> None:
    job_id = _job(server)
    result = medtune(
        "export", job_id, "--format", "merged_16bit", "--wait", "--poll", "0.2", url=server.url
    )
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split() == ["ENTRY", "NAME", "SIZE", "SHA256", "STATUS", "ERROR"]
    path = server.home / job_id / "merged_16bit" / "model-merged_16bit.bin"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert row.split() == [
        "merged_16bit",
        "merged_16bit/model-merged_16bit.bin",
        "11.7",
        "KiB",
        digest,
        "ok",
        "-",
    ]

    # Again: the old ok entry is in the manifest already; --wait waits for the new one.
    server.queue.delay_s = 2.0
    started = time.monotonic()
    again = medtune(
        "export", job_id, "--format", "merged_16bit", "--wait", "--poll", "0.2", url=server.url
    )
    assert again.returncode == 0, again.stderr
    assert time.monotonic() - started > 2.0
    assert again.stdout.splitlines()[1].split()[-2:] == ["ok", "-"]


def test_export_wait_json_and_a_failed_entry(server: Server) -> None:
    job_id = _job(server)
    server.queue.fail = {"gguf_f16"}
    result = medtune(
        "export",
        job_id,
        "--format",
        "gguf",
        "--quantization",
        "f16",
        "q4_k_m",
        "--wait",
        "--json",
        "--poll",
        "0.2",
        url=server.url,
    )
    assert result.returncode == 1, result.stderr
    body = json.loads(result.stdout)
    assert body["status"] == "failed" and body["artifacts"] == ["gguf_f16", "gguf_q4_k_m"]
    assert body["results"]["gguf_f16"] == {
        "status": "failed",
        "error": {"code": "export_gguf_f16_failed", "message": "the merged weights do not fit"},
    }
    [file] = body["results"]["gguf_q4_k_m"]["files"]
    assert file["file"] == "model-gguf_q4_k_m.bin" and file["bytes"] == 11000

    # The same table without --json: the failed entry's code in the ERROR column.
    listed = medtune("jobs", "artifacts", job_id, url=server.url)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert rows["gguf_f16"][-2:] == ["failed", "export_gguf_f16_failed"]
    assert rows["gguf_q4_k_m"][1] == "gguf_q4_k_m/model-gguf_q4_k_m.bin"
    as_json = json.loads(medtune("jobs", "artifacts", job_id, "--json", url=server.url).stdout)
    assert as_json["formats"]["gguf_q4_k_m"]["files"] == [file]


def test_download_writes_the_file_and_checks_its_sha256(server: Server, tmp_path: Path) -> None:
    job_id = _job(server)
    waited = medtune(
        "export", job_id, "--format", "lora", "--wait", "--poll", "0.2", url=server.url
    )
    assert waited.returncode == 0, waited.stderr
    target = tmp_path / "out.bin"
    got = medtune(
        "artifacts", "download", job_id, "lora/model-lora.bin", "-o", str(target), url=server.url
    )
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == str(target)
    assert target.read_bytes() == b"lora" * 1000
    assert hashlib.sha256(target.read_bytes()).hexdigest() in got.stderr

    missing = medtune("artifacts", "download", job_id, "lora/secret.txt", url=server.url)
    assert missing.returncode == 2 and missing.stderr.startswith("error artifact_not_found: ")
    bad = medtune("artifacts", "download", job_id, "model-lora.bin", url=server.url)
    assert bad.returncode == 2 and bad.stderr.startswith("error invalid_artifact_path: ")


def test_errors_are_exit_2_with_the_api_code(server: Server) -> None:
    queued = _job(server, succeeded=False)
    not_ready = medtune("export", queued, "--format", "lora", "--wait", url=server.url)
    assert not_ready.returncode == 2, not_ready.stdout
    assert not_ready.stderr.startswith("error job_not_ready: ") and queued in not_ready.stderr
    assert "Traceback" not in not_ready.stderr
    assert not [c for c in server.queue.calls if c.name == EXPORT_TASK]

    no_artifacts = medtune("jobs", "artifacts", queued, url=server.url)
    assert no_artifacts.returncode == 2
    assert no_artifacts.stderr.startswith("error artifacts_not_ready: ")
    unknown = medtune("export", "job_nope", "--format", "lora", url=server.url)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error job_not_found: ")

    done = _job(server)
    stray = medtune("export", done, "--format", "lora", "--quantization", "f16", url=server.url)
    assert stray.returncode == 2 and stray.stderr.startswith("error invalid_argument: ")
    timed_out = medtune(
        "export",
        done,
        "--format",
        "lora",
        "--wait",
        "--timeout",
        "0.3",
        "--poll",
        "0.1",
        url=server.url,
    )
    assert timed_out.returncode == 2
    assert timed_out.stderr.splitlines()[-1].startswith("error export_wait_timeout: lora of job")
