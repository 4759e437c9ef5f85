"""API keys: hashed at rest, required when auth is on, and each key sees only its own jobs."""

from __future__ import annotations

import hashlib
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from api.deps import get_queue
from api.main import create_app
from cli.main import main as medtune
from core import auth
from core.inference.stream import channel_for
from core.settings import Settings, get_settings
from core.store import jobs
from core.store.db import session_scope
from core.store.models import ApiKey, JobStatus
from tests.api.in_process import FakeQueue, assert_problem
from tests.helpers import recipe_spec

ADMIN_KEY = "env-admin-" + "x" * 30


def build(db_url: str, home: Path, queue: FakeQueue, **settings: Any) -> FastAPI:
    """The app with ``settings`` (auth required and the env admin key unless overridden)."""
    app = create_app()
    values: dict[str, Any] = {"auth": "required", "admin_key": ADMIN_KEY, **settings}
    resolved = Settings(  # type: ignore[call-arg]
        _env_file=None, database_url=db_url, home=home, **values
    )
    app.dependency_overrides[get_settings] = lambda: resolved
    app.dependency_overrides[get_queue] = lambda: queue
    queue.channel = channel_for(resolved)
    return app


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_key(db_url: str, *, name: str = "k", admin: bool = False) -> tuple[str, str]:
    """(key id, raw key)."""
    with session_scope(db_url) as s:
        row, raw = auth.create_key(s, name=name, admin=admin)
    return row.id, raw


class Secure:
    def __init__(self, db_url: str, client: TestClient, queue: FakeQueue) -> None:
        self.db_url = db_url
        self.client = client
        self.queue = queue

    def create(self, key: str, **training: Any) -> dict[str, Any]:
        response = self.client.post(
            "/jobs", json=recipe_spec("sample:medical_qa", **training), headers=bearer(key)
        )
        assert response.status_code == 201, response.text
        return response.json()


@pytest.fixture
def secure(sqlite_url: str, tmp_path: Path) -> Iterator[Secure]:
    queue = FakeQueue()
    with TestClient(build(sqlite_url, tmp_path / "home", queue)) as client:
        yield Secure(sqlite_url, client, queue)


# --- keys at rest ------------------------------------------------------------------------------


def _db_bytes(db_url: str) -> bytes:
    path = Path(make_url(db_url).database or "")
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


def test_a_created_key_is_stored_only_as_its_hash(sqlite_url: str) -> None:
    key_id, raw = new_key(sqlite_url, name="ci")
    assert raw.startswith(auth.KEY_PREFIX) and len(raw) >= 40
    path = make_url(sqlite_url).database
    assert path
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT * FROM api_keys").fetchall()
    assert len(rows) == 1
    assert all(raw not in str(value) for value in rows[0])
    with session_scope(sqlite_url) as s:
        stored = s.get(ApiKey, key_id)
        assert stored is not None
        assert stored.key_hash == hashlib.sha256(raw.encode()).hexdigest()
        assert raw.startswith(stored.prefix) and len(stored.prefix) < 16
    assert raw.encode() not in _db_bytes(sqlite_url)


def test_keys_cli_prints_the_key_once_and_stores_its_hash(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEDTUNE_DATABASE_URL", sqlite_url)
    get_settings.cache_clear()
    try:
        assert medtune(["keys", "create", "--name", "ci", "--admin"]) == 0
        raw = capsys.readouterr().out.strip()
        assert raw.startswith(auth.KEY_PREFIX)
        assert raw.encode() not in _db_bytes(sqlite_url)
        assert medtune(["keys", "list", "--json"]) == 0
        listed = capsys.readouterr().out
        assert raw not in listed and raw[:11] in listed
        with session_scope(sqlite_url) as s:
            (row,) = auth.list_keys(s)
        assert (row.name, row.admin, row.key_hash) == ("ci", True, auth.hash_key(raw))
        assert medtune(["keys", "revoke", row.id]) == 0
        with session_scope(sqlite_url) as s:
            assert auth.list_keys(s)[0].revoked_at is not None
        assert medtune(["keys", "revoke", "key_nope"]) == 2
        assert "key_not_found" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()


# --- 401 ---------------------------------------------------------------------------------------

PROTECTED = [
    ("get", "/jobs", None),
    ("post", "/jobs", recipe_spec("sample:medical_qa")),
    ("get", "/jobs/job_x", None),
    ("post", "/jobs/job_x/cancel", None),
    ("get", "/jobs/job_x/metrics", None),
    ("get", "/jobs/job_x/events", None),
    ("get", "/jobs/job_x/checkpoints", None),
    ("get", "/jobs/job_x/dataset", None),
    ("post", "/infer", {"job_id": "job_x", "question": "Fever?"}),
    ("post", "/datasets/preview", {}),
    ("get", "/metrics", None),
    ("get", "/v1/fine_tuning/jobs", None),
    ("get", "/v1/fine_tuning/jobs/job_x", None),
]


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-key"),
        pytest.param(bearer("mt_not-a-key"), id="unknown-key"),
        pytest.param(bearer(ADMIN_KEY[:-1]), id="admin-key-off-by-one"),
        pytest.param({"Authorization": f"Basic {ADMIN_KEY}"}, id="not-bearer"),
    ],
)
def test_every_job_route_needs_a_valid_key(
    secure: Secure, method: str, path: str, body: Any, headers: dict[str, str]
) -> None:
    response = secure.client.request(method, path, json=body, headers=headers)
    problem = assert_problem(response, 401, "unauthorized", "Authorization")
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="medtune"')
    assert ("invalid_token" in response.headers["WWW-Authenticate"]) is bool(headers)
    assert "mt_" not in problem["detail"]
    assert secure.queue.calls == []


# Routes anyone may call: liveness probes, and the dashboard page (its API calls need a key).
PUBLIC = {"/healthz", "/"}


def test_no_route_forgets_to_ask_for_a_key(secure: Secure) -> None:
    """Every API route but the public ones answers 401 without a key, routes added later too."""
    checked = 0
    for template, operations in secure.client.get("/openapi.json").json()["paths"].items():
        if template in PUBLIC:
            continue
        path = re.sub(r"\{[^}]+\}", "x", template)
        for method in operations:
            response = secure.client.request(method, path, json={})
            assert response.status_code == 401, (method, template, response.text)
            checked += 1
    assert checked >= 20
    assert secure.queue.calls == []


def test_revoked_key_is_refused(secure: Secure) -> None:
    key_id, raw = new_key(secure.db_url)
    assert secure.client.get("/jobs", headers=bearer(raw)).status_code == 200
    with session_scope(secure.db_url) as s:
        auth.revoke_key(s, key_id)
    assert_problem(secure.client.get("/jobs", headers=bearer(raw)), 401, "unauthorized", None)


def test_healthz_is_open_and_says_keys_are_required(secure: Secure) -> None:
    response = secure.client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "auth": "required"}


def test_admin_key_from_the_environment_works(secure: Secure) -> None:
    assert secure.client.get("/jobs", headers=bearer(ADMIN_KEY)).status_code == 200
    job = secure.create(ADMIN_KEY)
    with session_scope(secure.db_url) as s:
        assert jobs.get_job(s, job["id"]).owner_key_id is None


def test_metrics_endpoint_needs_an_admin_key(secure: Secure) -> None:
    _, raw = new_key(secure.db_url)
    assert_problem(secure.client.get("/metrics", headers=bearer(raw)), 403, "forbidden", None)
    _, admin = new_key(secure.db_url, admin=True)
    assert secure.client.get("/metrics", headers=bearer(admin)).status_code == 200


# --- ownership ---------------------------------------------------------------------------------


@pytest.fixture
def owned(secure: Secure) -> dict[str, str]:
    """Key a's succeeded job (metrics and dataset stats stored) and queued job; key b; admins."""
    a_id, a = new_key(secure.db_url, name="a")
    _, b = new_key(secure.db_url, name="b")
    _, admin = new_key(secure.db_url, name="ops", admin=True)
    finished = secure.create(a)["id"]
    queued = secure.create(a)["id"]
    with session_scope(secure.db_url) as s:
        assert jobs.claim(s, finished, worker="test")
        jobs.set_fields(s, finished, dataset_stats={"examples": 8})
        jobs.add_metrics(s, finished, [{"step": n, "loss": 1.0 / n} for n in range(1, 4)])
        jobs.finish(s, finished, JobStatus.succeeded)
        assert jobs.get_job(s, finished).owner_key_id == a_id
    secure.queue.calls.clear()
    return {"a": a, "b": b, "admin": admin, "finished": finished, "queued": queued}


JOB_ROUTES = [
    # (method, path, body, what the owner gets)
    ("get", "/jobs/{finished}", None, 200),
    ("get", "/jobs/{finished}/metrics", None, 200),
    ("get", "/jobs/{finished}/events?poll_seconds=0.05", None, 200),
    ("get", "/jobs/{finished}/checkpoints", None, 200),
    ("get", "/jobs/{finished}/dataset", None, 200),
    ("get", "/jobs/{finished}/evaluation", None, 409),  # none written: not ready, not hidden
    ("get", "/jobs/{finished}/artifacts", None, 409),
    ("get", "/jobs/{finished}/artifacts/lora/adapter_model.safetensors", None, 409),
    ("post", "/infer", {"job_id": "{finished}", "question": "Fever?"}, 200),
    ("post", "/jobs/{queued}/cancel", None, 200),
    ("get", "/v1/fine_tuning/jobs/{finished}", None, 200),
    ("get", "/v1/fine_tuning/jobs/{finished}/events", None, 200),
    ("get", "/v1/fine_tuning/jobs/{finished}/checkpoints", None, 200),
    ("post", "/v1/fine_tuning/jobs/{queued}/cancel", None, 200),
]


def _fill(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**ids) if "{" in value else value
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("method", "path", "body", "owner_status"), JOB_ROUTES)
def test_another_key_gets_404_the_owner_and_admins_get_the_job(
    secure: Secure, owned: dict[str, str], method: str, path: str, body: Any, owner_status: int
) -> None:
    url, payload = _fill(path, owned), _fill(body, owned)
    other = secure.client.request(method, url, json=payload, headers=bearer(owned["b"]))
    problem = assert_problem(other, 404, "job_not_found", None)
    assert owned["a"] not in problem["detail"]
    assert secure.queue.calls == []
    with session_scope(secure.db_url) as s:
        assert jobs.get_job(s, owned["queued"]).status == JobStatus.queued  # not cancelled
    for key in ("a", "admin", "env"):
        raw = ADMIN_KEY if key == "env" else owned[key]
        if method == "post" and "cancel" in url and key != "a":
            continue  # the owner's cancel below is the one that changes the job
        response = secure.client.request(method, url, json=payload, headers=bearer(raw))
        assert response.status_code == owner_status, (key, response.text)


def test_another_key_lists_none_of_the_owners_jobs(secure: Secure, owned: dict[str, str]) -> None:
    mine = {owned["finished"], owned["queued"]}
    b_job = secure.create(owned["b"])["id"]

    def listed(key: str, path: str = "/jobs") -> set[str]:
        response = secure.client.get(path, headers=bearer(key))
        assert response.status_code == 200, response.text
        return {j["id"] for j in response.json()["data"]}

    assert listed(owned["a"]) == mine
    assert listed(owned["b"]) == {b_job}
    assert listed(owned["admin"]) == listed(ADMIN_KEY) == mine | {b_job}
    assert listed(owned["b"], "/v1/fine_tuning/jobs") == {b_job}
    assert listed(owned["admin"], "/v1/fine_tuning/jobs") == mine | {b_job}
    # A cursor naming the owner's job does not page into it either.
    after = secure.client.get(
        "/v1/fine_tuning/jobs", params={"after": owned["finished"]}, headers=bearer(owned["b"])
    )
    assert_problem(after, 404, "job_not_found", "after")


# --- auth modes --------------------------------------------------------------------------------


def _client(db_url: str, tmp_path: Path, *, peer: tuple[str, int], **settings: Any) -> TestClient:
    """A client whose requests arrive on 127.0.0.1:8000 from ``peer``, as uvicorn reports them."""
    values = {"auth": "auto", "admin_key": None, **settings}
    app = build(db_url, tmp_path / "home", FakeQueue(), **values)
    return TestClient(app, base_url="http://127.0.0.1:8000", client=peer)


@pytest.mark.parametrize(
    ("host", "peer", "mode"),
    [
        pytest.param("127.0.0.1", ("127.0.0.1", 50000), "disabled (loopback only)", id="loopback"),
        pytest.param("localhost", ("::1", 50000), "disabled (loopback only)", id="localhost-v6"),
        pytest.param("0.0.0.0", ("127.0.0.1", 50000), "required", id="bound-to-all"),
        pytest.param("192.0.2.10", ("192.0.2.99", 50000), "required", id="bound-to-lan"),
        # The setting says loopback, but this connection came from another machine.
        pytest.param("127.0.0.1", ("203.0.113.7", 50000), "required", id="remote-peer"),
    ],
)
def test_auto_mode_needs_keys_unless_bound_to_loopback(
    sqlite_url: str, tmp_path: Path, host: str, peer: tuple[str, int], mode: str
) -> None:
    with _client(sqlite_url, tmp_path, peer=peer, api_host=host) as client:
        assert client.get("/healthz").json()["auth"] == mode
        response = client.get("/jobs")
        if mode == "required":
            assert_problem(response, 401, "unauthorized", None)
        else:
            assert response.status_code == 200, response.text


def test_auth_disabled_needs_no_key_even_when_bound_to_all(sqlite_url: str, tmp_path: Path) -> None:
    peer = ("203.0.113.7", 50000)
    with _client(sqlite_url, tmp_path, peer=peer, api_host="0.0.0.0", auth="disabled") as c:
        assert c.get("/healthz").json()["auth"] == "disabled"
        assert c.get("/jobs").status_code == 200


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("example.org", False),
        ("", False),
        (None, False),
    ],
)
def test_is_loopback(host: str | None, expected: bool) -> None:
    assert auth.is_loopback(host) is expected


def test_up_start_line_names_the_auth_mode(sqlite_url: str, tmp_path: Path) -> None:
    loopback = Settings(  # type: ignore[call-arg]
        _env_file=None, database_url=sqlite_url, home=tmp_path
    )
    assert auth.describe(loopback) == "disabled (loopback only)"
    public = Settings(  # type: ignore[call-arg]
        _env_file=None, database_url=sqlite_url, home=tmp_path, api_host="0.0.0.0"
    )
    assert "no API key exists yet" in auth.describe(public)
    new_key(sqlite_url)
    assert auth.describe(public) == "required (1 active keys)"


def test_medtune_api_tells_the_app_its_bind_host(monkeypatch: pytest.MonkeyPatch) -> None:
    import cli.main

    monkeypatch.setenv("MEDTUNE_API_HOST", "127.0.0.1")  # restored after the test
    seen: dict[str, Any] = {}

    def fake_exec(argv: list[str]) -> int:
        seen.update(argv=argv, host=get_settings().api_host)
        return 0

    monkeypatch.setattr(cli.main, "_exec", fake_exec)
    try:
        assert medtune(["api", "--host", "0.0.0.0", "--port", "8123"]) == 0
    finally:
        get_settings.cache_clear()
    assert seen["host"] == "0.0.0.0"
    assert seen["argv"][seen["argv"].index("--host") + 1] == "0.0.0.0"
