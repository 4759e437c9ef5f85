"""``medtune jobs delete`` against a live API, and ``medtune retention`` on the stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from core.store.models import JobStatus
from tests.api.test_job_delete import files_under, finished
from tests.cli.test_cli_client import ROOT, medtune
from tests.cli.test_cli_files import server  # noqa: F401  (the live API fixture)
from tests.core.test_retention import _job
from tests.helpers import recipe_spec


def test_jobs_delete(server: str, sqlite_url: str, tmp_path: Path) -> None:  # noqa: F811
    home = tmp_path / "home"
    spec = recipe_spec("sample:medical_qa")
    done, queued = (httpx.post(f"{server}/jobs", json=spec).json()["id"] for _ in range(2))
    finished(sqlite_url, done, home)

    refused = medtune("jobs", "delete", queued, url=server)
    assert refused.returncode == 2
    assert (
        refused.stderr.startswith("error job_not_finished:") and "cancel it first" in refused.stderr
    )

    deleted = medtune("jobs", "delete", done, url=server)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.strip().startswith(f"job {done} deleted")
    assert not (home / "jobs" / done).exists()
    again = medtune("jobs", "delete", done, "--json", url=server)
    assert again.returncode == 2 and again.stderr.startswith("error job_not_found:")
    assert httpx.get(f"{server}/jobs/{queued}").json()["status"] == "queued"


def test_jobs_continue(server: str, sqlite_url: str, tmp_path: Path) -> None:  # noqa: F811
    spec = recipe_spec("sample:medical_qa", max_steps=3)
    source, queued = (httpx.post(f"{server}/jobs", json=spec).json()["id"] for _ in range(2))
    finished(sqlite_url, source, tmp_path / "home")
    changes = tmp_path / "changes.json"
    changes.write_text(json.dumps({"training_config": {"max_steps": 7}}))

    made = medtune("jobs", "continue", source, "-f", str(changes), url=server)
    assert made.returncode == 0, made.stderr
    job = httpx.get(f"{server}/jobs/{made.stdout.strip()}").json()
    assert job["spec"]["model_config"]["init_adapter"] == source
    assert job["spec"]["training_config"]["max_steps"] == 7
    assert (
        job["spec"]["training_config"]["learning_rate"] == spec["training_config"]["learning_rate"]
    )

    refused = medtune("jobs", "continue", queued, url=server)
    assert refused.returncode == 2 and refused.stderr.startswith("error init_adapter_not_ready:")


def _retention(*args: str, url: str, home: Path, days: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDTUNE_")}
    env |= {"MEDTUNE_DATABASE_URL": url, "MEDTUNE_HOME": str(home), "MEDTUNE_RETENTION_DAYS": days}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "retention", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_retention_dry_run_then_sweep(sqlite_url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    old = _job(sqlite_url, home, "sample:medical_qa", JobStatus.succeeded, days_old=10)
    new = _job(sqlite_url, home, "sample:medical_qa", JobStatus.succeeded, days_old=1)
    before = files_under(home)

    off = _retention("--dry-run", url=sqlite_url, home=home, days="0")
    assert off.returncode == 2 and off.stderr.startswith("error retention_off:")

    dry = _retention("--dry-run", url=sqlite_url, home=home, days="7")
    assert dry.returncode == 0, dry.stderr
    assert "would remove" in dry.stdout and old in dry.stdout and new not in dry.stdout
    assert files_under(home) == before

    listed = _retention("--dry-run", "--json", url=sqlite_url, home=home, days="7")
    body = json.loads(listed.stdout)
    assert body["dry_run"] is True and [j["id"] for j in body["jobs"]] == [old]

    swept = _retention("--days", "5", url=sqlite_url, home=home, days="0")
    assert swept.returncode == 0, swept.stderr
    assert "removed" in swept.stdout and old in swept.stdout
    assert not (home / "jobs" / old).exists() and (home / "jobs" / new).is_dir()
