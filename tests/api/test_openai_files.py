"""/v1/files: OpenAI's File objects over the same uploaded files, usable as training_file."""

from __future__ import annotations

from pathlib import Path

from tests.api.files_helpers import JSONL, ROWS, upload
from tests.api.in_process import Api, assert_problem

FILE_KEYS = {
    "object",
    "id",
    "bytes",
    "created_at",
    "expires_at",
    "filename",
    "purpose",
    "status",
    "status_details",
}


def test_create_retrieve_content_delete_in_openai_shapes(api: Api, tmp_path: Path) -> None:
    created = upload(api.client, "train.jsonl", JSONL, path="/v1/files")
    assert created.status_code == 200, created.text
    body = created.json()
    assert set(body) == FILE_KEYS
    assert body["object"] == "file" and body["id"].startswith("file-")
    assert body["bytes"] == len(JSONL) and body["filename"] == "train.jsonl"
    assert body["purpose"] == "fine-tune" and body["status"] == "processed"
    assert isinstance(body["created_at"], int) and body["created_at"] > 1_700_000_000
    assert body["expires_at"] is None and body["status_details"] is None

    assert api.client.get(f"/v1/files/{body['id']}").json() == body
    content = api.client.get(f"/v1/files/{body['id']}/content")
    assert content.status_code == 200 and content.content == JSONL
    assert content.headers["content-type"] == "application/octet-stream"
    # The same file through medtune's own route.
    assert api.client.get(f"/files/{body['id']}").json()["bytes"] == len(JSONL)

    deleted = api.client.delete(f"/v1/files/{body['id']}")
    assert deleted.json() == {"id": body["id"], "object": "file", "deleted": True}
    assert_problem(api.client.get(f"/v1/files/{body['id']}"), 404, "file_not_found", "file_id")
    assert not (tmp_path / "home" / "data" / "uploads" / body["id"]).exists()


def test_list_pages_with_after_and_order(api: Api) -> None:
    ids = [
        upload(api.client, f"p{n}.jsonl", ROWS[n], path="/v1/files").json()["id"] for n in range(3)
    ]
    page = api.client.get("/v1/files").json()
    assert set(page) == {"object", "data", "has_more", "first_id", "last_id"}
    assert page["object"] == "list" and not page["has_more"]
    assert [f["id"] for f in page["data"]] == ids[::-1]
    assert all(set(f) == FILE_KEYS for f in page["data"])
    first = api.client.get("/v1/files", params={"limit": 2}).json()
    assert [f["id"] for f in first["data"]] == [ids[2], ids[1]] and first["has_more"]
    assert (first["first_id"], first["last_id"]) == (ids[2], ids[1])
    rest = api.client.get("/v1/files", params={"limit": 2, "after": first["last_id"]}).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]] and not rest["has_more"]
    oldest = api.client.get("/v1/files", params={"order": "asc", "after": ids[0]}).json()
    assert [f["id"] for f in oldest["data"]] == ids[1:]
    assert api.client.get("/v1/files", params={"purpose": "batch"}).json()["data"] == []


def test_a_purpose_other_than_fine_tune_is_refused(api: Api) -> None:
    response = upload(api.client, "t.jsonl", JSONL, path="/v1/files", purpose="assistants")
    assert_problem(response, 422, "invalid_choice", "purpose")


def test_fine_tuning_jobs_take_an_uploaded_file_id(api: Api) -> None:
    file_id = upload(api.client, "train.jsonl", JSONL, path="/v1/files").json()["id"]
    body = {
        "model": "smollm2-135m-instruct",
        "training_file": file_id,
        "medtune": {"training_config": {"max_steps": 2}, "model_config": {"max_seq_length": 256}},
    }
    created = api.client.post("/v1/fine_tuning/jobs", json=body)
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["training_file"] == file_id and job["status"] == "queued"
    assert (
        api.client.get(f"/jobs/{job['id']}").json()["spec"]["training_dataset"]["name"] == file_id
    )
    # The file is in use until the job ends.
    assert_problem(api.client.delete(f"/v1/files/{file_id}"), 409, "file_in_use", "file_id")
    missing = api.client.post(
        "/v1/fine_tuning/jobs", json={**body, "training_file": "file-0000000000000000000000ff"}
    )
    assert_problem(missing, 404, "file_not_found", "training_file")
