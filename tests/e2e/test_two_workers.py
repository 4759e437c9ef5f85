"""Two worker processes on one machine share one Redis and one Postgres and train side by side.

Runs scripts/two_workers.sh (API + two workers started as real processes) and checks its
claim against the job store: each job ran on its own worker, at the same time.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from tests.conftest import ROOT, claim_redis_db, free_port, stack_env

pytestmark = pytest.mark.slow


@pytest.fixture
def private_redis_url() -> Iterator[str]:
    """A Redis database of its own: the session's shared worker must not take these jobs."""
    url = claim_redis_db()
    yield url
    redis.Redis.from_url(url).flushdb()


def test_two_workers_run_two_jobs_at_the_same_time(
    tmp_path: Path, migrated_pg: str, private_redis_url: str, model_cache: Path
) -> None:
    env = stack_env(tmp_path, model_cache, database_url=migrated_pg, broker_url=private_redis_url)
    env["MEDTUNE_PORT"] = str(free_port())
    env["MEDTUNE"] = str(Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "medtune")
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "two_workers.sh"), "3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted((tmp_path / "logs").glob("*.log"))
    )
    assert done.returncode == 0, done.stdout + done.stderr + logs
    submitted = re.search(r"submitted (\S+) and (\S+)", done.stdout)
    assert submitted, done.stdout
    with session_scope(migrated_pg) as s:
        first, second = (jobs.get_job(s, job_id) for job_id in submitted.groups())
    assert first.status == second.status == JobStatus.succeeded
    assert first.worker and second.worker and first.worker != second.worker
    assert {first.worker.split("@")[0], second.worker.split("@")[0]} == {"gpu0", "gpu1"}
    assert first.started_at and second.started_at and first.finished_at and second.finished_at
    # Each started before the other finished: their running intervals overlap.
    assert first.started_at < second.finished_at and second.started_at < first.finished_at
