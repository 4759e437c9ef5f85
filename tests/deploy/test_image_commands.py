"""The images' commands and healthchecks, run here: start, answer, stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from core.queue import INFER_QUEUE, TRAIN_QUEUE
from tests.deploy.helpers import (
    DOCKERFILE_API,
    DOCKERFILE_GPU,
    ROOT,
    _clean_env,
    _dockerfile_healthcheck,
    _instructions,
    _json_array,
    _tool,
)

# --- the images' commands, run here ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(proc: subprocess.Popen, log: Path, needle: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if needle in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"never saw {needle!r}:\n{log.read_text(errors='replace')[-4000:]}")


def test_api_cmd_and_healthcheck_work_and_stop_on_sigterm(tmp_path: Path) -> None:
    """Dockerfile.api's CMD (on a free port) serves, its HEALTHCHECK passes, SIGTERM stops it."""
    port = _free_port()
    env = _clean_env(
        MEDTUNE_HOME=str(tmp_path),
        MEDTUNE_DATABASE_URL=f"sqlite:///{tmp_path / 'jobs.db'}",
        MEDTUNE_BROKER_URL="memory://",
        PYTHONPATH=str(ROOT),
    )
    migrate = subprocess.run(
        [_tool("medtune"), "migrate"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert migrate.returncode == 0, migrate.stderr[-3000:]

    cmd = _json_array(_instructions(DOCKERFILE_API, "CMD")[-1])
    cmd[0] = _tool(cmd[0])
    cmd[cmd.index("--port") + 1] = str(port)
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    log = tmp_path / "api.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        _wait_for(proc, log, "Application startup complete", 60)
        probe = _dockerfile_healthcheck(DOCKERFILE_API)
        assert probe[:2] == ["python", "-c"]
        code = probe[2].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        check = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
        assert check.returncode == 0, check.stderr
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_worker_healthcheck_fails_when_the_broker_is_down() -> None:
    probe = _dockerfile_healthcheck(DOCKERFILE_GPU)
    assert probe[:2] == ["python", "-c"]
    dead = f"redis://127.0.0.1:{_free_port()}/0"
    result = subprocess.run(
        [sys.executable, "-c", probe[2]],
        cwd=ROOT,
        env=_clean_env(MEDTUNE_BROKER_URL=dead, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0


def test_worker_healthcheck_passes_when_the_broker_answers(tmp_path: Path) -> None:
    import redis

    url = os.environ.get("MEDTUNE_TEST_REDIS", "redis://127.0.0.1:6379/15")
    redis.Redis.from_url(url, socket_connect_timeout=2).ping()  # the suite's Redis is up
    probe = _dockerfile_healthcheck(DOCKERFILE_GPU)
    result = subprocess.run(
        [sys.executable, "-c", probe[2]],
        cwd=ROOT,
        env=_clean_env(MEDTUNE_BROKER_URL=url, MEDTUNE_HOME=str(tmp_path), PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    ("source", "queue", "pool"),
    [("image", TRAIN_QUEUE, "solo"), ("infer", INFER_QUEUE, "thread")],
)
def test_worker_commands_start_and_stop_on_sigterm(
    tmp_path: Path, resolved: dict[str, Any], source: str, queue: str, pool: str
) -> None:
    """Dockerfile.gpu's CMD (the training worker) and compose's infer command, as they are (on
    the CPU): Celery starts on its one queue, SIGTERM ends it."""
    env = _clean_env(
        MEDTUNE_HOME=str(tmp_path),
        MEDTUNE_DATABASE_URL=f"sqlite:///{tmp_path / 'jobs.db'}",
        MEDTUNE_BROKER_URL=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        PYTHONPATH=str(ROOT),
    )
    if source == "image":
        cmd = _json_array(_instructions(DOCKERFILE_GPU, "CMD")[-1])
    else:
        cmd = list(resolved["services"][source]["command"])
    cmd[0] = _tool(cmd[0])
    log = tmp_path / "worker.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        _wait_for(proc, log, " ready.", 120)
        text = log.read_text(errors="replace")
        consumed = {q for q in (TRAIN_QUEUE, INFER_QUEUE) if f".> {q} " in text}
        assert consumed == {queue}, text[-3000:]
        assert f"({pool})" in text, text[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
