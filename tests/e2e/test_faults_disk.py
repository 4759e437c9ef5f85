"""A full or read-only artifacts volume fails the job with a clear code; what was complete stays.

We run as root, so file modes do not stop writes: the worker's artifacts folder
(MEDTUNE_HOME/jobs) is a real, small tmpfs mounted for the test. It holds one training
checkpoint of the tests' light LoRA (r=4 on q_proj and v_proj of the embedded model: 0.9 MB of
weights plus AdamW's two moments, about 2.8 MB) but not two, so it fills up while the second
checkpoint is written: the job fails with disk_full, the first checkpoint stays complete and
listed, and the half-written one is removed. The same volume remounted read-only then fails
the next job with artifacts_unwritable, and every file already on it is left as it was.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import Stack, free_port, start_api, start_worker, wait_healthy
from tests.e2e.private_services import (
    PrivateRedis,
    fault_env,
    fresh_database,
    light_spec,
    wait_final,
)
from tests.helpers import tiny_dataset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]  # slow when the cores are busy

VOLUME_MB = 4  # one checkpoint (about 2.8 MB) fits, a second does not


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """MEDTUNE_HOME whose jobs/ folder is a VOLUME_MB tmpfs; unmounted even if the test fails."""
    home = tmp_path / "home"
    jobs_dir = home / "jobs"
    jobs_dir.mkdir(parents=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={VOLUME_MB}m", "tmpfs", str(jobs_dir)]
    done = subprocess.run(mount, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield home
    finally:
        subprocess.run(["umount", "--lazy", str(jobs_dir)], check=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_full_then_read_only_artifacts_volume(
    tmp_path: Path, small_volume: Path, model_cache: Path
) -> None:
    jobs_dir = small_volume / "jobs"
    with PrivateRedis() as broker, fresh_database() as db_url:
        env = fault_env(small_volume, model_cache, database_url=db_url, broker_url=broker.url)
        port = free_port()
        stack = Stack(url=f"http://127.0.0.1:{port}", home=tmp_path)
        try:
            start_api(stack, port, env)
            start_worker(stack, "worker", env, queues="medtune.train")
            wait_healthy(stack)
            data = tiny_dataset(tmp_path / "tiny.jsonl")
            with stack.client() as client:
                # A checkpoint every step: the first fits, the second fills the volume.
                full = client.post("/jobs", json=light_spec(data, max_steps=4, save_steps=1))
                job = wait_final(client, full.json()["id"])
                assert job["status"] == "failed", stack.tail_logs() + str(job)
                assert job["error"]["code"] == "disk_full", job["error"]
                assert "full" in job["error"]["message"] and "/" not in job["error"]["message"]
                saved = client.get(f"/jobs/{job['id']}/checkpoints").json()["data"]
                assert [c["step"] for c in saved] == [1], saved
                root = jobs_dir / job["id"] / "outputs" / "checkpoints"
                assert sorted(p.name for p in root.iterdir()) == ["checkpoint-1"]  # no debris
                weights = load_file(root / "checkpoint-1" / "adapter_model.safetensors")
                assert weights  # the complete checkpoint still loads

                before = _files(jobs_dir)
                remount = ["mount", "-o", "remount,ro", str(jobs_dir)]
                subprocess.run(remount, check=True, capture_output=True)
                read_only = client.post("/jobs", json=light_spec(data, max_steps=2))
                job2 = wait_final(client, read_only.json()["id"])
                assert job2["status"] == "failed", stack.tail_logs() + str(job2)
                assert job2["error"]["code"] == "artifacts_unwritable", job2["error"]
                assert _files(jobs_dir) == before  # the earlier job's artifacts are untouched
                assert stack.procs[1].poll() is None  # the worker itself carries on
        finally:
            stack.stop()
