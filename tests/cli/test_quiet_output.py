"""A newcomer's first commands are quiet: `medtune up` prints where its logs go and, once the
API and both workers answer, that it is up; `medtune demo` prints its job, one progress bar and
the answers. Everything else (Alembic, Celery's banners, httpx's request lines) stays in
$MEDTUNE_HOME/services.log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli import services
from core.queue import RUN_JOB_TASK
from tests.api.in_process import FakeQueue
from tests.conftest import DATA_ROOTS, ROOT, free_port
from tests.job_files import finish_job
from tests.live_api import serve

NOISE = ("INFO", "WARNING", "HTTP Request", "alembic", "celery@", "Loading weights", " ---------")


@dataclass
class TrainingQueue(FakeQueue):
    """A job sent to train is finished a moment later, as a worker would leave it."""

    db_url: str = ""
    home: Path = Path()
    threads: list[threading.Thread] = field(default_factory=list)

    def send_task(self, name: str, args: list[Any] | None = None, **kw: Any) -> Any:
        result = super().send_task(name, args, **kw)
        if name == RUN_JOB_TASK and args:
            worker = threading.Thread(target=self._train, args=(args[0],))
            worker.start()
            self.threads.append(worker)
        return result

    def _train(self, job_id: str) -> None:
        time.sleep(1.0)
        finish_job(self.db_url, self.home, job_id, steps=6, pause_s=1.5)


@pytest.fixture
def server(sqlite_url: str, tmp_path: Path) -> Iterator[str]:
    queue = TrainingQueue(db_url=sqlite_url, home=tmp_path / "home")
    with serve(sqlite_url, tmp_path / "home", queue) as url:
        yield url
    for worker in queue.threads:
        worker.join(timeout=10)


def test_the_demo_prints_its_job_one_bar_and_the_answers(server: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDTUNE_")}
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "demo", "--url", server, "--max-steps", "6"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0].startswith("job job_") and lines[0].endswith("6 steps")
    bars = [line for line in lines if "loss" in line]
    assert [b.split()[2] for b in bars] == [f"{n}/6" for n in range(1, 7)], done.stdout
    assert all("tok/s" in b and "ETA" in b for b in bars)
    status = [line for line in lines if line.startswith("[")]
    assert len(status) == len(set(status)) <= 4  # each change once, not one per step
    assert not [line for line in lines if any(n in line for n in NOISE)]
    assert sum(line.startswith("Q: ") for line in lines) == 2
    assert sum(line.lstrip().startswith(("base :", "tuned:")) for line in lines) == 4


@pytest.mark.slow
def test_up_is_quiet_and_up_only_when_every_service_answers(
    tmp_path: Path, model_cache: Path
) -> None:
    home, port = tmp_path / "home", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDTUNE_")}
    env.update(
        MEDTUNE_HOME=str(home),
        MEDTUNE_MODEL_CACHE=str(model_cache),
        MEDTUNE_DATA_ROOTS=json.dumps(DATA_ROOTS),
        HF_HUB_OFFLINE="1",
    )
    up = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "up", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert up.stdout is not None
        first = up.stdout.readline()
        assert first == f"starting medtune (service logs: {home / 'services.log'})\n"
        second = up.stdout.readline()
        assert second.startswith(f"medtune is up: http://127.0.0.1:{port}/"), second
        # Said only once the API answers and both workers have logged their ready line.
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        log = (home / "services.log").read_text()
        assert "[train]" in log and "train@" in log and "infer@" in log and " ready." in log
        assert "alembic" in log.lower()
    finally:
        up.send_signal(signal.SIGINT)
        out, err = up.communicate(timeout=60)
    assert up.returncode == 0
    assert out == "" and err == "", out + err


def test_a_worker_is_ready_when_it_logs_so_and_an_exit_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log, lock = (tmp_path / "services.log").open("wb"), threading.Lock()
    api = serve_health()
    ready = services.start(
        "train",
        [sys.executable, "-c", "import time; print('[x] train@box ready.'); time.sleep(30)"],
        log=log,
        lock=lock,
        verbose=False,
        ready_pattern=services.worker_ready_pattern("train"),
    )
    try:
        assert services.wait_until_ready([ready], api, timeout_s=30) == []
        crashed = services.start(
            "infer",
            [sys.executable, "-c", "raise SystemExit('no broker')"],
            log=log,
            lock=lock,
            verbose=False,
            ready_pattern=services.worker_ready_pattern("infer"),
        )
        missing = services.wait_until_ready([ready, crashed], api, timeout_s=30)
        assert missing == ["infer (exited 1)"]
    finally:
        ready.process.kill()
    log.close()
    text = (tmp_path / "services.log").read_text()
    assert "[train] [x] train@box ready." in text and "[infer] no broker" in text
    assert capsys.readouterr().err == ""  # not --verbose: nothing on the terminal


def serve_health() -> str:
    """A server whose /healthz answers 200, as the API's does."""
    import http.server

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the stdlib names the handler so
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"
