"""Jobs that name an uploaded file (/files): accepted by id, resolved by the worker, guarded
against paths into the uploads folder and against deleting a file a queued job uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.data.sources import DatasetPathNotAllowed, load_rows, resolve_local
from core.errors import DatasetNotFound
from core.settings import get_settings
from core.spec import JobSpec
from core.store import files
from tests.api.files_helpers import JSONL, ROWS, stored, upload, uploads_dir
from tests.api.in_process import Api, assert_problem
from tests.conftest import Stack
from tests.helpers import recipe_spec, wait_status

# --- jobs that name an uploaded file ------------------------------------------------------------


def test_a_job_on_an_uploaded_file_is_accepted_and_the_worker_resolves_it(
    api: Api, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file_id = upload(api.client, "train.jsonl", JSONL).json()["id"]
    job_ids = []
    for name in (file_id, f"file:{file_id}"):
        created = api.client.post("/jobs", json=recipe_spec(name))
        assert created.status_code == 201, created.text
        assert created.json()["spec"]["training_dataset"]["name"] == name
        job_ids.append(created.json()["id"])
    # The worker resolves the id with its own settings (MEDTUNE_HOME), not the API's.
    monkeypatch.setenv("MEDTUNE_HOME", str(home))
    get_settings.cache_clear()
    try:
        section = JobSpec.model_validate(recipe_spec(f"file:{file_id}")).dataset
        assert resolve_local(section) == (uploads_dir(home) / file_id / "train.jsonl").resolve()
        assert load_rows(section) == [json.loads(line) for line in ROWS[:6]]
        # Once the file is deleted, a job naming it fails in its data stage, saying why.
        for job_id in job_ids:
            assert api.client.post(f"/jobs/{job_id}/cancel").status_code == 200
        assert api.client.delete(f"/files/{file_id}").status_code == 200
        with pytest.raises(DatasetNotFound) as info:
            resolve_local(section)
        assert info.value.field == "training_dataset.name"
    finally:
        get_settings.cache_clear()


def test_unknown_or_malformed_file_ids_are_refused(api: Api) -> None:
    missing = api.client.post("/jobs", json=recipe_spec("file-0123456789abcdef01234567"))
    assert_problem(missing, 404, "file_not_found", "training_dataset.name")
    for name in ("file:../../etc/passwd", "file:", "file:file-a/b"):
        bad = api.client.post("/jobs", json=recipe_spec(name))
        assert_problem(bad, 422, "invalid_value", "training_dataset")


def test_a_path_into_the_uploads_folder_is_refused(api: Api, home: Path) -> None:
    """Uploaded files are reached by id only, so a path cannot step around their ownership."""
    file_id = upload(api.client, "train.jsonl", JSONL).json()["id"]
    for path in (uploads_dir(home) / file_id / "train.jsonl", uploads_dir(home), home / "data"):
        response = api.client.post("/jobs", json=recipe_spec(str(path)))
        assert_problem(response, 422, "dataset_path_not_allowed", "training_dataset.name")
    roots = [home.resolve()]
    link_folder = home / "linked"
    link_folder.mkdir()
    (link_folder / "sneaky.jsonl").symlink_to(uploads_dir(home) / file_id / "train.jsonl")
    section = JobSpec.model_validate(recipe_spec(str(link_folder))).dataset
    with pytest.raises(DatasetPathNotAllowed):
        resolve_local(section, roots=roots, uploads=uploads_dir(home))


def test_deleting_a_file_a_queued_job_uses_is_refused(api: Api, home: Path) -> None:
    file_id = upload(api.client, "train.jsonl", JSONL).json()["id"]
    job = api.client.post("/jobs", json=recipe_spec(file_id)).json()
    refused = assert_problem(api.client.delete(f"/files/{file_id}"), 409, "file_in_use", "file_id")
    assert job["id"] in refused["detail"]
    # Nothing was lost: the row, the bytes and the job's view of them are intact.
    assert api.client.get(f"/files/{file_id}/content").content == JSONL
    assert api.client.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    assert api.client.delete(f"/files/{file_id}").status_code == 200
    assert stored(home) == []


def test_file_refs_finds_every_dataset_name_that_is_a_file() -> None:
    spec = {
        "training_dataset": {
            "sources": [
                {"name": "sample:medical_qa"},
                {"name": "file:file-abc"},
                {"name": "file-def", "weight": 2},
            ]
        },
        "validation_dataset": {"name": "file:file-ghi"},
        "model_config": {"name": "file-not-a-dataset"},
    }
    assert files.file_refs(spec) == [
        ("training_dataset.sources[1].name", "file-abc"),
        ("training_dataset.sources[2].name", "file-def"),
        ("validation_dataset.name", "file-ghi"),
    ]
    # A stored spec without a validation set has validation_dataset: null.
    assert files.file_refs({"training_dataset": {"name": "x"}, "validation_dataset": None}) == []


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_job_trains_on_an_uploaded_jsonl(pg_redis_stack: Stack) -> None:
    """Upload over HTTP, train on the file by id on the real worker, then the file is free."""
    with pg_redis_stack.client() as client:
        uploaded = upload(client, "tiny.jsonl", b"".join(ROWS[:4]))  # type: ignore[arg-type]
        assert uploaded.status_code == 201, uploaded.text
        file_id = uploaded.json()["id"]
        created = client.post("/jobs", json=recipe_spec(f"file:{file_id}", max_steps=1))
        assert created.status_code == 201, created.text
        # Generous: a step took minutes on the shared 2-core machine under load.
        job = wait_status(
            client, created.json()["id"], {"succeeded", "failed", "cancelled"}, timeout_s=900
        )
        assert job["status"] == "succeeded", pg_redis_stack.tail_logs() + str(job)
        assert job["steps_done"] == 1 and job["dataset_stats"]["examples"] == 4
        assert job["dataset_stats"]["by_source"] == {f"file:{file_id}": 4}
        # A finished job needs its file no more.
        assert client.delete(f"/files/{file_id}").status_code == 200


def test_a_mix_source_may_name_an_uploaded_file(api: Api) -> None:
    file_id = upload(api.client, "train.jsonl", JSONL).json()["id"]
    spec = recipe_spec("sample:medical_qa")
    spec["training_dataset"] = {
        "sources": [{"name": "sample:medical_qa"}, {"name": file_id, "weight": 2}]
    }
    created = api.client.post("/jobs", json=spec)
    assert created.status_code == 201, created.text
    spec["training_dataset"]["sources"][1]["name"] = "file-0123456789abcdef01234567"
    missing = api.client.post("/jobs", json=spec)
    assert_problem(missing, 404, "file_not_found", "training_dataset.sources[1].name")
