"""``medtune up``'s child processes: their output goes to one log file (and the terminal with
``--verbose``), and "up" is said only once the API and every worker answer.

A worker is ready when Celery logs ``<name>@<host> ready.`` (its consumer is running); the API
when ``/healthz`` answers 200. Celery's ``inspect ping`` is not used: it needs a broadcast
exchange, which the embedded SQLite broker (Kombu's SQLAlchemy transport) does not have.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx


@dataclass
class Child:
    """One service process and whether it has said it is ready."""

    name: str
    process: subprocess.Popen[bytes]
    ready_pattern: re.Pattern[bytes] | None = None
    ready: threading.Event = field(default_factory=threading.Event)


def worker_ready_pattern(name: str) -> re.Pattern[bytes]:
    # celery.apps.worker logs "%s ready." with the node name given as -n name@%h.
    return re.compile(rb"\b" + re.escape(name.encode()) + rb"@\S+ ready\.")


def _pump(child: Child, log: IO[bytes], lock: threading.Lock, verbose: bool) -> None:
    assert child.process.stdout is not None
    for line in iter(child.process.stdout.readline, b""):
        if child.ready_pattern is not None and child.ready_pattern.search(line):
            child.ready.set()
        with lock:
            log.write(f"[{child.name}] ".encode() + line)
            log.flush()
            if verbose:
                sys.stderr.buffer.write(line)
                sys.stderr.flush()


def start(
    name: str,
    argv: list[str],
    *,
    log: IO[bytes],
    lock: threading.Lock,
    verbose: bool,
    env: dict[str, str] | None = None,
    ready_pattern: re.Pattern[bytes] | None = None,
) -> Child:
    """Start ``argv``; a thread copies its output (stdout and stderr) line by line to ``log``."""
    # Unbuffered: a ready line must reach the pipe when it is logged, not when a buffer fills.
    env = {**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    child = Child(name, process, ready_pattern)
    threading.Thread(target=_pump, args=(child, log, lock, verbose), daemon=True).start()
    return child


def api_answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def wait_until_ready(
    children: list[Child], api_url: str, *, timeout_s: float, poll_s: float = 0.5
) -> list[str]:
    """Wait for every worker's ready line and the API's 200; what is still missing (empty:
    all up). Stops early when a child exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    api_up = False
    while True:
        api_up = api_up or api_answers(api_url)
        exited = [c for c in children if c.process.poll() is not None]
        missing = [
            c.name
            for c in children
            if c.ready_pattern is not None and not c.ready.is_set() and c not in exited
        ]
        missing += [] if api_up else ["api"]
        if not missing and not exited:
            return []
        if exited or time.monotonic() > deadline:
            return [f"{c.name} (exited {c.process.returncode})" for c in exited] + missing
        time.sleep(poll_s)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
