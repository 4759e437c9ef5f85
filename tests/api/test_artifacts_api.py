"""GET /jobs/{id}/artifacts and the download route: listed files only, clear errors otherwise."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from core.export.formats import MANIFEST, describe
from core.store import jobs
from core.store.db import session_scope
from tests.api.in_process import Api, assert_problem


def test_artifacts_listed_downloaded_and_guarded(api: Api, tmp_path: Path) -> None:
    job_id = api.create()["id"]
    assert_problem(
        api.client.get(f"/jobs/{job_id}/artifacts"), 409, "artifacts_not_ready", "job_id"
    )
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    manifest = {
        "lora": {"status": "ok", "folder": "adapter", "files": describe(adapter), "smoke_test": []}
    }
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / "secret.txt").write_text("not an artifact")
    with session_scope(api.db_url) as s:
        assert jobs.claim(s, job_id, worker="w")
        jobs.set_fields(s, job_id, artifacts_dir=str(tmp_path))
    listed = api.client.get(f"/jobs/{job_id}/artifacts").json()
    assert listed["formats"]["lora"]["files"][0]["bytes"] == 700
    got = api.client.get(f"/jobs/{job_id}/artifacts/lora/adapter_model.safetensors")
    assert got.status_code == 200 and got.content == b"weights" * 100
    assert got.headers["x-checksum-sha256"] == hashlib.sha256(got.content).hexdigest()
    # Only listed files: no way to reach other files of the job's folder.
    for path in ("lora/secret.txt", "lora/..%2Fsecret.txt", "gguf/adapter_model.safetensors"):
        response = api.client.get(f"/jobs/{job_id}/artifacts/{path}")
        assert response.status_code == 404, path
    (adapter / "adapter_model.safetensors").unlink()
    assert_problem(
        api.client.get(f"/jobs/{job_id}/artifacts/lora/adapter_model.safetensors"),
        404,
        "artifact_missing",
        "file_name",
    )
