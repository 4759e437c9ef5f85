"""DELETE /jobs/{id}: a finished job's rows and folder go, and nothing else; active jobs are 409."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from tests.api.in_process import Api, FakeQueue, assert_problem
from tests.api.test_auth import bearer, build, new_key
from tests.helpers import recipe_spec, tiny_dataset


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def write_artifacts(folder: Path) -> None:
    """What a finished job leaves: adapter, checkpoints, TensorBoard events, evaluation, exports."""
    for name, text in {
        "adapter/adapter_config.json": "{}",
        "adapter/adapter_model.safetensors": "weights",
        "outputs/checkpoints/checkpoint-2/trainer_state.json": "{}",
        "tensorboard/events.out.tfevents.1.host": "events",
        "evaluation.json": '{"answers": ["patient data"]}',
        "artifacts.json": json.dumps({"lora": {"status": "ok", "files": []}}),
        "spec.json": "{}",
    }.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def finished(db_url: str, job_id: str, home: Path, status: JobStatus = JobStatus.succeeded) -> Path:
    folder = home / "jobs" / job_id
    write_artifacts(folder)
    with session_scope(db_url) as s:
        assert jobs.claim(s, job_id, worker="w")
        jobs.add_metrics(s, job_id, [{"step": n, "loss": 1.0 / n} for n in range(1, 4)])
        jobs.finish(
            s, job_id, status, artifacts_dir=str(folder), adapter_dir=str(folder / "adapter")
        )
    return folder


def test_delete_removes_the_job_its_rows_and_only_its_files(api: Api, tmp_path: Path) -> None:
    home = tmp_path / "home"
    upload = api.client.post(
        "/files", files={"file": ("tiny.jsonl", tiny_dataset(tmp_path / "t.jsonl").read_bytes())}
    )
    assert upload.status_code == 201, upload.text
    gone, kept = api.create()["id"], api.create()["id"]
    finished(api.db_url, gone, home)
    finished(api.db_url, kept, home, JobStatus.failed)
    before, rows_before = files_under(tmp_path / "home"), api.snapshot()

    response = api.client.delete(f"/jobs/{gone}")
    assert response.status_code == 200, response.text
    assert response.json() == {"id": gone, "object": "job", "deleted": True}

    after = files_under(tmp_path / "home")
    prefix = f"jobs/{gone}/"
    assert {k for k in before if k.startswith(prefix)} and not any(
        k.startswith(prefix) for k in after
    )
    assert after == {k: v for k, v in before.items() if not k.startswith(prefix)}
    assert not (home / "jobs" / gone).exists()
    rows = api.snapshot()
    assert [r for r in rows["jobs"] if r[0] == gone] == []
    assert rows["jobs"] == [r for r in rows_before["jobs"] if r[0] != gone]
    assert rows["job_metrics"] == [r for r in rows_before["job_metrics"] if gone not in r]
    assert len(rows["job_metrics"]) == 3  # the kept job's
    assert_problem(api.client.get(f"/jobs/{gone}"), 404, "job_not_found", "job_id")
    assert_problem(api.client.delete(f"/jobs/{gone}"), 404, "job_not_found", "job_id")
    assert api.client.get(f"/jobs/{kept}").json()["status"] == "failed"
    assert api.client.get(f"/files/{upload.json()['id']}").status_code == 200


def test_delete_removes_the_prepared_data_the_job_used(api: Api, tmp_path: Path) -> None:
    # The entry in the API's own MEDTUNE_HOME (its injected settings), not another home's.
    from core.data import prepared_cache

    home = tmp_path / "home"
    job_id = api.create()["id"]
    folder = finished(api.db_url, job_id, home)
    key = "ab" * 32
    prepared_cache.record_for_job(folder, key)
    entry = home / "cache" / "prepared" / f"{key}.json"
    entry.parent.mkdir(parents=True)
    entry.write_text("{}")

    assert api.client.delete(f"/jobs/{job_id}").status_code == 200
    assert not entry.exists()


def test_a_queued_or_running_job_is_refused_until_cancelled(api: Api, tmp_path: Path) -> None:
    queued, running = api.create()["id"], api.create()["id"]
    with session_scope(api.db_url) as s:
        assert jobs.claim(s, running, worker="w")
    folder = tmp_path / "home" / "jobs" / running
    write_artifacts(folder)
    before = files_under(tmp_path / "home")
    for job_id, status in ((queued, "queued"), (running, "running")):
        problem = assert_problem(
            api.client.delete(f"/jobs/{job_id}"), 409, "job_not_finished", "job_id"
        )
        assert f"is {status}" in problem["detail"] and "cancel it first" in problem["detail"]
        assert api.client.get(f"/jobs/{job_id}").json()["status"] == status
    assert files_under(tmp_path / "home") == before
    assert api.client.post(f"/jobs/{queued}/cancel").json()["status"] == "cancelled"
    assert api.client.delete(f"/jobs/{queued}").status_code == 200


def test_an_export_still_writing_is_refused(api: Api, tmp_path: Path) -> None:
    job_id = api.create()["id"]
    folder = finished(api.db_url, job_id, tmp_path / "home")
    (folder / "artifacts.json").write_text(json.dumps({"gguf_q4_k_m": {"status": "running"}}))
    assert_problem(api.client.delete(f"/jobs/{job_id}"), 409, "export_running", "job_id")
    assert (folder / "adapter" / "adapter_config.json").is_file()


def test_another_key_gets_404_and_nothing_goes(sqlite_url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    _, a = new_key(sqlite_url, name="a")
    _, b = new_key(sqlite_url, name="b")
    with TestClient(build(sqlite_url, home, FakeQueue())) as client:
        made = client.post("/jobs", json=recipe_spec("sample:medical_qa"), headers=bearer(a))
        job_id = made.json()["id"]
        finished(sqlite_url, job_id, home)
        before = files_under(tmp_path / "home")
        problem = assert_problem(
            client.delete(f"/jobs/{job_id}", headers=bearer(b)), 404, "job_not_found", "job_id"
        )
        assert a not in problem["detail"]
        assert files_under(tmp_path / "home") == before
        assert client.get(f"/jobs/{job_id}", headers=bearer(a)).status_code == 200
        assert client.delete(f"/jobs/{job_id}", headers=bearer(a)).status_code == 200
        assert not (home / "jobs" / job_id).exists()
