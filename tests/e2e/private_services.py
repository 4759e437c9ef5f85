"""A Redis server and a PostgreSQL cluster of a test's own, on free loopback ports.

Fault tests stop, kill and restart these; the shared servers on 6379 and 5432 are never touched.
Each is a context manager that stops its process and deletes its files on the way out, also when
the test failed.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import psycopg
import redis

from tests.conftest import PG_ADMIN, free_port, stack_env
from tests.helpers import recipe_spec, wait_status

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"  # PostgreSQL refuses to run as root


class PrivateRedis:
    """redis-server with persistence off: a restart comes back empty, as a lost broker does."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="medtune-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.dir / "redis.log").open("ab")
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.dir)]
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"private redis did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: no shutdown save, so everything it held is gone."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def restart_empty(self) -> None:
        self.kill()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivatePostgres:
    """A throwaway cluster (trust auth, fsync off) run by the postgres user."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="medtune-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"

    @property
    def admin_url(self) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/postgres"

    def url(self, database: str = "medtune") -> str:
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def _as_postgres(self, *argv: str) -> None:
        subprocess.run(
            ["runuser", "-u", PG_USER, "--", *argv],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def init(self) -> None:
        shutil.chown(self.root, PG_USER, PG_USER)
        self._as_postgres(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            PG_USER,
            "--auth=trust",
            "-E",
            "UTF8",
        )

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        pg_ctl = str(PG_BIN / "pg_ctl")
        self._as_postgres(
            pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start"
        )

    def stop(self) -> None:
        """Fast shutdown: open connections are cut, as in a real restart."""
        pg_ctl = str(PG_BIN / "pg_ctl")
        self._as_postgres(pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def create_database(self, name: str = "medtune") -> str:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def __enter__(self) -> Self:
        self.init()
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self.running():
                pg_ctl = str(PG_BIN / "pg_ctl")
                self._as_postgres(pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def fresh_database(admin_url: str = PG_ADMIN) -> Iterator[str]:
    """A new, migrated database on a running server (the shared one by default), dropped after."""
    from core.store.migrate import upgrade

    name = f"medtune_fault_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{url}/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def job_rows(db_url: str, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """What the job store says of each job: status, attempts, worker, notes and metric steps."""
    libpq = db_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(libpq) as conn:
        rows: dict[str, dict[str, Any]] = {}
        for job_id in job_ids:
            status, attempts, worker, notes, enqueued_at = conn.execute(
                "SELECT status, attempts, worker, notes, enqueued_at FROM jobs WHERE id = %s",
                (job_id,),
            ).fetchone()
            steps = [
                r[0]
                for r in conn.execute(
                    "SELECT step FROM job_metrics WHERE job_id = %s ORDER BY step", (job_id,)
                )
            ]
            rows[job_id] = {
                "status": status,
                "attempts": attempts,
                "worker": worker,
                "notes": notes,
                "enqueued_at": enqueued_at,
                "steps": steps,
            }
    return rows


# Training on a shared 2-core machine can be slow; these tests wait on outcomes, not speed.
WAIT_S = 1500


def light_spec(dataset: Path, **training: Any) -> dict[str, Any]:
    """The tests' recipe spec made cheap: what these tests check is job handling, not training."""
    spec = recipe_spec(dataset, per_device_train_batch_size=1, **training)
    spec["model_config"]["max_seq_length"] = 128  # the tiny dataset's rows are under 100 tokens
    spec["lora_config"].update(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    spec["lora_config"]["use_gradient_checkpointing"] = False
    return spec


def fault_env(home: Path, model_cache: Path, **settings: str) -> dict[str, str]:
    """stack_env, with one torch thread per worker: these tests run beside others on 2 cores."""
    return {**stack_env(home, model_cache, **settings), "OMP_NUM_THREADS": "1"}


def wait_final(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """The job once it is succeeded, failed or cancelled."""
    return wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, WAIT_S)


def wait_for_line(log: Path, text: str, timeout_s: float = WAIT_S) -> None:
    """Until a process's log file contains ``text``."""
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{log.name} did not log {text!r} in {timeout_s} s"
        time.sleep(0.2)


def assert_ran_once(row: dict[str, Any], *, steps: int) -> None:
    """Succeeded on its first claim, by one worker, with each step's metric stored once."""
    assert row["status"] == "succeeded", row
    assert row["attempts"] == 1, f"claimed {row['attempts']} times: {row}"
    assert row["worker"], row
    assert row["steps"] == list(range(1, steps + 1)), f"metric steps {row['steps']}"
    assert not any("worker lost" in n for n in row["notes"]), row["notes"]
