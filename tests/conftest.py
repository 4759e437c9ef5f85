"""Shared fixtures: real Postgres and Redis on loopback, the embedded model, live service stacks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from cli.main import api_command, worker_command

# Torch's OpenMP threads spin while they wait for each other (libgomp's default). The suite runs
# the test process, APIs, workers, Postgres and Redis side by side on a few cores, often shared
# with other work: a spinning thread holds a core another process needs, and a thread that was
# descheduled keeps its whole team spinning. On the shared 2-core machine a worker's training
# steps took 3-4x as long so (the recipe's 6 steps: 98-103 s spinning, 29-35 s passive, two
# threads each). Passive threads sleep instead. Set before anything imports torch (libgomp reads
# it once, at load); every process the tests start inherits it (stack_env copies os.environ).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("MEDTUNE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_SERVER = "redis://127.0.0.1:6379"
REDIS_URL = os.environ.get("MEDTUNE_TEST_REDIS")  # default: a free database, claimed below
SHARED_DATA = ROOT.parent / "shared" / "data"
# Dataset paths must lie in allowed folders: tests write theirs under pytest's base temp folder.
DATA_ROOTS: list[str] = []


@pytest.fixture(autouse=True)
def settings_of_this_test_only() -> Iterator[None]:
    """Settings cached while a test changed the environment must not outlive it. Autouse
    fixtures are torn down after the test's own monkeypatch, so the cache is dropped once the
    environment is back."""
    from core.settings import get_settings

    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session", autouse=True)
def data_roots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Allow datasets from the session's temp folders and the shared data, here and in stacks."""
    from core.settings import get_settings

    DATA_ROOTS[:] = [str(tmp_path_factory.getbasetemp()), str(SHARED_DATA)]
    previous = os.environ.get("MEDTUNE_DATA_ROOTS")
    os.environ["MEDTUNE_DATA_ROOTS"] = json.dumps(DATA_ROOTS)
    get_settings.cache_clear()
    yield DATA_ROOTS
    if previous is None:
        os.environ.pop("MEDTUNE_DATA_ROOTS", None)
    else:
        os.environ["MEDTUNE_DATA_ROOTS"] = previous
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """The embedded model, converted once per machine and reused (as `make model` does)."""
    from core.embedded_model import prepare_embedded_model

    cache = Path(os.environ.get("MEDTUNE_MODEL_CACHE", ROOT / ".medtune" / "models"))
    prepare_embedded_model(cache)
    return cache


@pytest.fixture(scope="session")
def model_dir(model_cache: Path) -> Path:
    from core.embedded_model import EMBEDDED_MODEL_NAME

    return model_cache / EMBEDDED_MODEL_NAME


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh database on the local PostgreSQL server, dropped at the end."""
    import psycopg

    name = f"medtune_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    from core.store.db import get_engine

    get_engine.cache_clear()
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def migrated_pg(pg_url: str) -> str:
    from core.store.migrate import upgrade

    upgrade(pg_url)
    return pg_url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis database this test session has to itself.

    Workers of two test sessions on one queue would take each other's jobs, so each session
    claims an empty database (SETNX of a marker key) and releases it at the end.
    """
    url = REDIS_URL or claim_redis_db()
    redis.Redis.from_url(url).flushdb()
    yield url
    redis.Redis.from_url(url).flushdb()


def claim_redis_db() -> str:
    for db in range(1, 16):
        client = redis.Redis.from_url(f"{REDIS_SERVER}/{db}")
        # Claimed only if empty: a database in use by anyone else has keys in it.
        if client.dbsize() == 0 and client.set("medtune:test-claim", os.getpid(), nx=True):
            return f"{REDIS_SERVER}/{db}"
    raise RuntimeError("no free Redis database (1-15) on 127.0.0.1:6379 for this test session")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    from core.store.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    return url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    """Service processes started for a test, reachable at ``url``."""

    url: str
    home: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=httpx.Timeout(30, read=300))

    def tail_logs(self, lines: int = 40) -> str:
        out = []
        for log in self.logs:
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def start(stack: Stack, name: str, argv: list[str], env: dict[str, str]) -> None:
    log = stack.home / f"{name}.log"
    stack.logs.append(log)
    fh = log.open("wb")
    stack.procs.append(
        subprocess.Popen(argv, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    )


def start_api(stack: Stack, port: int, env: dict[str, str]) -> None:
    start(stack, "api", api_command("127.0.0.1", port), env)


def start_worker(stack: Stack, name: str, env: dict[str, str], *, queues: str) -> None:
    # A unique node name: two workers of one host must not share one.
    start(stack, name, worker_command(queues, f"{name}-{free_port()}"), env)


def wait_healthy(stack: Stack, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{stack.url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if any(p.poll() is not None for p in stack.procs):
            break
        time.sleep(0.3)
    stack.stop()
    raise RuntimeError("service did not come up:\n" + stack.tail_logs())


def stack_env(home: Path, model_cache: Path, **urls: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDTUNE_")}
    env.update(
        MEDTUNE_HOME=str(home),
        MEDTUNE_MODEL_CACHE=str(model_cache),
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        MEDTUNE_DATA_ROOTS=json.dumps(DATA_ROOTS),
    )
    env.update({f"MEDTUNE_{k.upper()}": v for k, v in urls.items()})
    return env


@pytest.fixture(scope="session")
def pg_redis_stack(
    tmp_path_factory: pytest.TempPathFactory, migrated_pg: str, redis_url: str, model_cache: Path
) -> Iterator[Stack]:
    """API + one Celery worker (both queues) on real Postgres and real Redis, shared by every
    live test that needs no settings of its own. Webhooks may target loopback and are retried
    quickly (tests/e2e/test_continue_and_webhook_live.py runs a receiver in the test process),
    and W&B runs offline."""
    home = tmp_path_factory.mktemp("stack")
    env = stack_env(home, model_cache, database_url=migrated_pg, broker_url=redis_url)
    env |= {
        "MEDTUNE_WEBHOOK_ALLOW_PRIVATE": "1",
        "MEDTUNE_WEBHOOK_POLL_S": "0.5",
        "MEDTUNE_WEBHOOK_BACKOFF_S": "0.5",
        "WANDB_MODE": "offline",
    }
    port = free_port()
    stack = Stack(url=f"http://127.0.0.1:{port}", home=home)
    start_worker(stack, "worker", env, queues="medtune.train,medtune.infer")
    start_api(stack, port, env)
    wait_healthy(stack)
    yield stack
    stack.stop()
