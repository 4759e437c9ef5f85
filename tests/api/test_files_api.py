"""/files: uploads streamed to the data folder, checked, owned per API key (jobs that use them:
tests/api/test_files_jobs.py)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from core.store import files
from core.store.db import session_scope
from core.store.models import IdempotencyKey
from tests.api.files_helpers import (
    JSONL,
    MEDQUAD_XML,
    ROWS,
    file_rows,
    parquet_bytes,
    stored,
    upload,
    uploads_dir,
)
from tests.api.in_process import Api, FakeQueue, assert_problem
from tests.api.test_auth import ADMIN_KEY, bearer, build, new_key
from tests.helpers import recipe_spec, zip_bytes

# --- upload, list, read, download, delete -------------------------------------------------------


def test_upload_stores_the_bytes_under_their_id_and_reads_back(api: Api, home: Path) -> None:
    response = upload(api.client, "train.jsonl", JSONL)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"].startswith("file-") and body["object"] == "file"
    assert body["filename"] == "train.jsonl" and body["purpose"] == "fine-tune"
    assert body["bytes"] == len(JSONL)
    assert body["sha256"] == hashlib.sha256(JSONL).hexdigest()
    # Exactly one folder, named by the id, holding the bytes: no staging folder is left.
    assert stored(home) == [uploads_dir(home) / body["id"]]
    assert (uploads_dir(home) / body["id"] / "train.jsonl").read_bytes() == JSONL

    read = api.client.get(f"/files/{body['id']}")
    assert read.status_code == 200 and read.json() == body
    content = api.client.get(f"/files/{body['id']}/content")
    assert content.status_code == 200 and content.content == JSONL
    assert content.headers["x-checksum-sha256"] == body["sha256"]
    assert 'filename="train.jsonl"' in content.headers["content-disposition"]


def test_list_is_newest_first_and_pages_by_id(api: Api) -> None:
    ids = [upload(api.client, f"part{n}.jsonl", ROWS[n]).json()["id"] for n in range(3)]
    page = api.client.get("/files", params={"limit": 2}).json()
    assert [f["id"] for f in page["data"]] == ids[::-1][:2]
    assert page["has_more"] and page["last_id"] == ids[1]
    rest = api.client.get("/files", params={"limit": 2, "after": page["last_id"]}).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]] and not rest["has_more"]
    unknown = api.client.get("/files", params={"after": "file-nope"})
    assert_problem(unknown, 404, "file_not_found", "after")


def test_delete_removes_the_row_and_the_bytes(api: Api, home: Path) -> None:
    file_id = upload(api.client, "train.jsonl", JSONL).json()["id"]
    deleted = api.client.delete(f"/files/{file_id}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"id": file_id, "object": "file", "deleted": True}
    assert stored(home) == [] and file_rows(api.db_url) == []
    for method, path in (
        ("GET", f"/files/{file_id}"),
        ("GET", f"/files/{file_id}/content"),
        ("DELETE", f"/files/{file_id}"),
    ):
        assert_problem(api.client.request(method, path), 404, "file_not_found", "file_id")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("rows.jsonl", JSONL),
        ("rows.json", json.dumps([{"question": "Q?", "answer": "A."}]).encode()),
        ("rows.csv", b"question,answer\nWhat is a fever?,A raised temperature.\n"),
        ("rows.parquet", parquet_bytes()),
        ("medquad.zip", zip_bytes({"1_GHR/0000001.xml": MEDQUAD_XML})),
        ("0000001.xml", MEDQUAD_XML),
    ],
)
def test_every_type_the_data_stage_reads_is_accepted(api: Api, name: str, content: bytes) -> None:
    response = upload(api.client, name, content)
    assert response.status_code == 201, response.text
    assert response.json()["bytes"] == len(content)


# --- refused uploads ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("model.exe", b"MZ\x90\x00"),
        ("notes.txt", b"question,answer\n"),
        ("no-suffix", JSONL),
        ("image.jsonl", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),  # binary under a text name
        ("text.jsonl", b"just some words\nand more\n"),  # text, but no JSON object
        ("list.jsonl", b"[1, 2, 3]\n"),  # JSON, but not an object per line
        ("rows.json", b"question: what?"),
        ("fake.parquet", b"question,answer\nq,a\n"),
        ("empty.zip", zip_bytes({"readme.txt": b"no xml here"})),
        ("broken.zip", b"PK\x03\x04 not really a zip"),
        ("page.xml", b"%PDF-1.7 not xml"),
        ("latin1.csv", "question,answer\ncaf\xe9,\xe9t\xe9\n".encode("latin-1")),
    ],
)
def test_wrong_types_are_refused_and_leave_nothing(
    api: Api, home: Path, name: str, content: bytes
) -> None:
    problem = assert_problem(
        upload(api.client, name, content), 415, "unsupported_file_type", "file"
    )
    assert ".jsonl" in problem["detail"]
    assert stored(home) == [] and file_rows(api.db_url) == []


def test_an_empty_file_is_refused(api: Api, home: Path) -> None:
    assert_problem(upload(api.client, "rows.jsonl", b""), 422, "file_empty", "file")
    assert stored(home) == []


@pytest.fixture
def small_limit(sqlite_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, Path]]:
    home = tmp_path / "small"
    app = build(sqlite_url, home, FakeQueue(), auth="disabled", max_upload_bytes=1000)
    with TestClient(app) as client:
        yield client, home


def test_the_size_limit_holds_while_streaming(
    small_limit: tuple[TestClient, Path], sqlite_url: str
) -> None:
    client, home = small_limit
    # Under Content-Length + envelope, so only the streaming check can stop it.
    problem = assert_problem(
        upload(client, "big.jsonl", JSONL[:5000]), 413, "file_too_large", "file"
    )
    assert "1000 bytes" in problem["detail"]
    assert stored(home) == [] and file_rows(sqlite_url) == []
    # Exactly at the limit is fine.
    exact = JSONL[:1000].rsplit(b"\n", 1)[0] + b"\n"
    exact += b" " * (1000 - len(exact))
    assert upload(client, "exact.jsonl", exact).status_code == 201


def test_a_declared_oversize_body_is_refused_before_it_is_read(
    small_limit: tuple[TestClient, Path],
) -> None:
    client, home = small_limit
    body = b"x" * 200_000  # Content-Length says far more than limit + envelope

    def never_read() -> Iterator[bytes]:
        raise AssertionError("the body was read")
        yield b""  # pragma: no cover

    response = client.post(
        "/files",
        content=never_read(),
        headers={
            "content-type": "multipart/form-data; boundary=xyz",
            "content-length": str(len(body)),
        },
    )
    assert_problem(response, 413, "file_too_large", "file")
    assert stored(home) == []


def raw_multipart(filename: bytes, content: bytes, boundary: bytes = b"b0undary") -> bytes:
    """A form body written by hand, so the file name goes out byte for byte."""
    return (
        b"--" + boundary + b"\r\n"
        b'Content-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n"
        b"--" + boundary + b"--\r\n"
    )


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (b"../../etc/cron.d/evil.jsonl", "evil.jsonl"),
        (b"C:\\Users\\me\\train.jsonl", "train.jsonl"),
        (b"bell\x07and\x1bescape\x7f.jsonl", "bellandescape.jsonl"),
        (b".hidden.jsonl", "hidden.jsonl"),
        ("caf\u00e9 \u202eflipped.jsonl".encode(), "caf\u00e9 flipped.jsonl"),
    ],
)
def test_file_names_lose_folders_and_control_characters(
    api: Api, home: Path, sent: bytes, kept: str
) -> None:
    response = api.client.post(
        "/files",
        content=raw_multipart(sent, JSONL),
        headers={"content-type": "multipart/form-data; boundary=b0undary"},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["filename"] == kept
    assert (uploads_dir(home) / body["id"] / kept).read_bytes() == JSONL
    assert sorted(p.name for p in uploads_dir(home).rglob("*")) == sorted([body["id"], kept])


def test_sanitize_filename_keeps_long_names_short_with_their_suffix() -> None:
    name = files.sanitize_filename("\u00e9" * 300 + ".jsonl")
    assert name.endswith(".jsonl") and len(name.encode()) <= 200
    assert files.sanitize_filename("/..") == ""


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "field"),
    [
        ({"content": b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
                     b"fine-tune\r\n--b--\r\n",
          "headers": {"content-type": "multipart/form-data; boundary=b"}}, 422, "missing_field",
         "file"),
        ({"files": {"file": ("a.jsonl", JSONL)}, "data": {"purpose": "batch"}}, 422,
         "invalid_choice", "purpose"),
        ({"files": {"file": ("a.jsonl", JSONL)}, "data": {"kind": "x"}}, 422, "unknown_field",
         "kind"),
        ({"json": {"file": "a.jsonl"}}, 415, "unsupported_media_type", "file"),
    ],
)  # fmt: skip
def test_malformed_forms_name_the_field(
    api: Api, home: Path, kwargs: dict[str, Any], status: int, code: str, field: str
) -> None:
    assert_problem(api.client.post("/files", **kwargs), status, code, field)
    assert stored(home) == []


def test_a_cut_off_body_stores_nothing(api: Api, home: Path) -> None:
    body = raw_multipart(b"train.jsonl", JSONL)
    cut = body[: body.index(b"\r\n--b0undary--")]
    response = api.client.post(
        "/files", content=cut, headers={"content-type": "multipart/form-data; boundary=b0undary"}
    )
    assert_problem(response, 400, "invalid_upload", "file")
    assert stored(home) == [] and file_rows(api.db_url) == []


# --- ownership and idempotency ------------------------------------------------------------------


@pytest.fixture
def secure_files(sqlite_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(build(sqlite_url, tmp_path / "home", FakeQueue())) as client:
        yield client


def test_another_key_gets_404_and_an_admin_sees_every_file(
    secure_files: TestClient, sqlite_url: str
) -> None:
    client = secure_files
    _, alice = new_key(sqlite_url, name="alice")
    _, bob = new_key(sqlite_url, name="bob")
    assert_problem(upload(client, "a.jsonl", JSONL), 401, "unauthorized", "Authorization")
    file_id = upload(client, "a.jsonl", JSONL, headers=bearer(alice)).json()["id"]
    for method, path in (
        ("GET", f"/files/{file_id}"),
        ("GET", f"/files/{file_id}/content"),
        ("DELETE", f"/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"),
    ):
        response = client.request(method, path, headers=bearer(bob))
        assert_problem(response, 404, "file_not_found", "file_id")
    assert client.get("/files", headers=bearer(bob)).json()["data"] == []
    # Bob cannot train on Alice's file either, and is told the same as for no file at all.
    spec = recipe_spec(file_id)
    refused = client.post("/jobs", json=spec, headers=bearer(bob))
    assert_problem(refused, 404, "file_not_found", "training_dataset.name")
    assert client.post("/jobs", json=spec, headers=bearer(alice)).status_code == 201
    listed = client.get("/files", headers=bearer(ADMIN_KEY)).json()["data"]
    assert [f["id"] for f in listed] == [file_id]
    assert client.get(f"/files/{file_id}", headers=bearer(alice)).status_code == 200


def test_a_retried_upload_returns_the_first_file(
    secure_files: TestClient, sqlite_url: str, tmp_path: Path
) -> None:
    client = secure_files
    _, key = new_key(sqlite_url)
    headers = {**bearer(key), "Idempotency-Key": "upload-1"}
    first = upload(client, "train.jsonl", JSONL, headers=headers)
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    again = upload(client, "train.jsonl", JSONL, headers=headers)
    assert again.status_code == 201, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert len(file_rows(sqlite_url)) == 1
    assert stored(tmp_path / "home") == [uploads_dir(tmp_path / "home") / first.json()["id"]]
    # The same key for other bytes, or for a job, is a conflict naming the first file.
    other = upload(client, "train.jsonl", JSONL + ROWS[7], headers=headers)
    problem = assert_problem(other, 409, "idempotency_key_reused", "Idempotency-Key")
    assert first.json()["id"] in problem["detail"]
    job = client.post("/jobs", json=recipe_spec("sample:medical_qa"), headers=headers)
    assert_problem(job, 409, "idempotency_key_reused", "Idempotency-Key")
    assert len(file_rows(sqlite_url)) == 1 and len(stored(tmp_path / "home")) == 1


def test_a_concurrent_upload_with_one_key_stores_one_file(sqlite_url: str, tmp_path: Path) -> None:
    """The loser meets the unique (scope, key) index, drops its bytes and replays the winner."""
    uploads = tmp_path / "uploads"

    def received() -> files.Upload:
        incoming = files.Upload(uploads_dir=uploads, filename="t.jsonl", max_bytes=10**6)
        incoming.write(JSONL)
        incoming.finish()
        return incoming

    with session_scope(sqlite_url) as s:
        first, replayed = files.store(s, received(), idempotency_scope="key_a", idempotency_key="k")
        assert not replayed
    # As if this request had looked for the key before the first one committed.
    late = received()
    with session_scope(sqlite_url) as s, pytest.MonkeyPatch.context() as mp:
        mp.setattr(files.idempotency, "replay_upload", _missing_once(files.idempotency))
        second, replayed = files.store(s, late, idempotency_scope="key_a", idempotency_key="k")
    assert replayed and second.id == first.id
    assert sorted(p.name for p in uploads.iterdir()) == [first.id]
    with session_scope(sqlite_url) as s:
        assert len(s.exec(select(IdempotencyKey)).all()) == 1


def _missing_once(module: Any) -> Any:
    real = module.replay_upload
    calls = {"n": 0}

    def replay_upload(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return None if calls["n"] == 1 else real(*args, **kwargs)

    return replay_upload
