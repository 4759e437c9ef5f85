"""Dataset path confinement, Idempotency-Key on POST /jobs, and per-key rate limits."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core import auth
from core.data.sources import DatasetPathNotAllowed, load_rows, resolve_local
from core.ratelimit import RateLimited, RateLimiter
from core.settings import get_settings
from core.spec import DatasetSection, JobSpec
from core.store import idempotency, jobs
from core.store.db import session_scope
from tests.api.in_process import FakeQueue, assert_problem
from tests.api.test_auth import bearer, build, new_key
from tests.helpers import recipe_spec, tiny_dataset


class Env:
    def __init__(self, client: TestClient, queue: FakeQueue, db_url: str, tmp: Path) -> None:
        self.client, self.queue, self.db_url, self.tmp = client, queue, db_url, tmp
        self.allowed = tmp / "allowed"
        self.outside = tmp / "outside"
        self.home_data = tmp / "home" / "data"

    def post(self, dataset: str | Path, key: str | None = None, **kwargs: Any) -> Any:
        headers = {**(bearer(key) if key else {}), **kwargs.pop("headers", {})}
        return self.client.post("/jobs", json=recipe_spec(dataset), headers=headers, **kwargs)

    def job_count(self) -> int:
        with session_scope(self.db_url) as s:
            return len(jobs.list_jobs(s, limit=100)[0])


def make_env(sqlite_url: str, tmp_path: Path, **settings: Any) -> Iterator[Env]:
    queue = FakeQueue()
    (tmp_path / "allowed").mkdir()
    (tmp_path / "outside").mkdir()
    # Only these folders: not pytest's base temp folder, which the session allows.
    values = {"data_roots": [tmp_path / "allowed"], **settings}
    app = build(sqlite_url, tmp_path / "home", queue, **values)
    with TestClient(app) as client:
        (tmp_path / "home" / "data").mkdir(parents=True, exist_ok=True)
        yield Env(client, queue, sqlite_url, tmp_path)


@pytest.fixture
def open_env(sqlite_url: str, tmp_path: Path) -> Iterator[Env]:
    """Auth disabled: the path checks alone."""
    yield from make_env(sqlite_url, tmp_path, auth="disabled")


@pytest.fixture
def keyed_env(sqlite_url: str, tmp_path: Path) -> Iterator[Env]:
    """Auth required, 2 jobs and 1 inference per key per minute."""
    yield from make_env(sqlite_url, tmp_path, rate_jobs_per_minute=2, rate_infer_per_minute=1)


# --- dataset paths -----------------------------------------------------------------------------


def test_datasets_in_the_allowed_folders_are_accepted(open_env: Env) -> None:
    tiny_dataset(open_env.allowed / "qa.jsonl")
    tiny_dataset(open_env.home_data / "qa.jsonl")
    (open_env.allowed / "nested").mkdir()
    tiny_dataset(open_env.allowed / "nested" / "a.jsonl")
    # A link that stays inside the allowed folders is fine.
    (open_env.allowed / "link.jsonl").symlink_to(open_env.home_data / "qa.jsonl")
    for name in ("qa.jsonl", "nested/", "nested/../qa.jsonl", "link.jsonl"):
        response = open_env.post(f"{open_env.allowed}/{name}")
        assert response.status_code == 201, (name, response.text)
    assert open_env.post(open_env.home_data / "qa.jsonl").status_code == 201
    assert len(open_env.queue.calls) == 5


@pytest.mark.parametrize(
    "escape",
    [
        pytest.param("absolute", id="absolute-path-outside"),
        pytest.param("dotdot", id="dotdot-escape"),
        pytest.param("symlink", id="symlink-escape"),
        pytest.param("symlinked-folder", id="symlinked-folder-escape"),
        pytest.param("link-in-folder", id="folder-holding-a-link-out"),
        pytest.param("missing-outside", id="missing-file-outside"),
        pytest.param("etc-passwd", id="etc-passwd"),
    ],
)
def test_dataset_paths_outside_the_allowed_folders_are_refused(open_env: Env, escape: str) -> None:
    secret = tiny_dataset(open_env.outside / "secret.jsonl")
    allowed = open_env.allowed
    if escape == "absolute":
        name = str(secret)
    elif escape == "dotdot":
        name = f"{allowed}/../outside/secret.jsonl"
    elif escape == "symlink":
        (allowed / "innocent.jsonl").symlink_to(secret)
        name = str(allowed / "innocent.jsonl")
    elif escape == "symlinked-folder":
        (allowed / "shared").symlink_to(open_env.outside, target_is_directory=True)
        name = f"{allowed}/shared/secret.jsonl"
    elif escape == "link-in-folder":
        folder = allowed / "set"
        folder.mkdir()
        tiny_dataset(folder / "ok.jsonl")
        (folder / "more.jsonl").symlink_to(secret)
        name = f"{folder}/"
    elif escape == "missing-outside":
        name = str(open_env.outside / "nothing-here.jsonl")
    else:
        name = "/etc/passwd.json"
    before = open_env.job_count()
    problem = assert_problem(
        open_env.post(name), 422, "dataset_path_not_allowed", "training_dataset.name"
    )
    # The answer names what the client sent and no other server path.
    detail = problem["detail"].replace(name, "<name>")
    for server_path in (str(open_env.tmp), "/work", str(Path.home())):
        assert server_path not in detail, detail
    assert open_env.queue.calls == []
    assert open_env.job_count() == before


def test_the_preview_is_confined_too(open_env: Env) -> None:
    secret = tiny_dataset(open_env.outside / "secret.jsonl")
    body = {"training_dataset": {"name": str(secret)}}
    response = open_env.client.post("/datasets/preview", json=body)
    assert_problem(response, 422, "dataset_path_not_allowed", "training_dataset.name")
    assert open_env.queue.calls == []


def test_the_worker_checks_the_path_again_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_rows (what the pipeline calls) refuses a path outside the worker's own roots."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    tiny_dataset(allowed / "qa.jsonl")
    (allowed / "link.jsonl").symlink_to(tiny_dataset(outside / "secret.jsonl"))
    monkeypatch.setenv("MEDTUNE_DATA_ROOTS", str(allowed))
    monkeypatch.setenv("MEDTUNE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    try:
        assert len(load_rows(DatasetSection(name=str(allowed / "qa.jsonl")))) == 8
        for name in (str(allowed / "link.jsonl"), str(outside / "secret.jsonl")):
            with pytest.raises(DatasetPathNotAllowed):
                load_rows(DatasetSection(name=name))
    finally:
        get_settings.cache_clear()
    # Explicit roots win over the settings.
    assert resolve_local(DatasetSection(name=str(outside / "secret.jsonl")), roots=[outside])


def test_data_roots_setting_reads_json_or_a_path_list(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import Settings

    monkeypatch.setenv("MEDTUNE_DATA_ROOTS", f"/srv/a{os.pathsep}/srv/b")
    assert Settings(_env_file=None).data_roots == [Path("/srv/a"), Path("/srv/b")]  # type: ignore[call-arg]
    monkeypatch.setenv("MEDTUNE_DATA_ROOTS", '["/srv/c"]')
    assert Settings(_env_file=None).data_roots == [Path("/srv/c")]  # type: ignore[call-arg]


# --- Idempotency-Key ---------------------------------------------------------------------------


def test_a_retry_with_the_same_key_returns_the_first_job_and_queues_nothing(
    keyed_env: Env,
) -> None:
    _, key = new_key(keyed_env.db_url)
    spec = recipe_spec("sample:medical_qa")
    first = keyed_env.client.post(
        "/jobs", json=spec, headers={**bearer(key), "Idempotency-Key": "retry-1"}
    )
    assert first.status_code == 201, first.text
    assert "Idempotent-Replayed" not in first.headers
    # The same spec written differently (key order) is the same request.
    reordered = dict(reversed(list(spec.items())))
    again = keyed_env.client.post(
        "/jobs", json=reordered, headers={**bearer(key), "Idempotency-Key": "retry-1"}
    )
    assert again.status_code == 201, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert len(keyed_env.queue.calls) == 1
    assert keyed_env.job_count() == 1
    # A replay costs no rate-limit token: the key may still create its second job.
    assert keyed_env.client.post("/jobs", json=spec, headers=bearer(key)).status_code == 201


def test_the_same_key_with_another_spec_is_a_conflict(keyed_env: Env) -> None:
    _, key = new_key(keyed_env.db_url)
    headers = {**bearer(key), "Idempotency-Key": "k-1"}
    first = keyed_env.client.post("/jobs", json=recipe_spec("sample:medical_qa"), headers=headers)
    assert first.status_code == 201
    other = recipe_spec("sample:medical_qa", learning_rate=1e-3)
    problem = assert_problem(
        keyed_env.client.post("/jobs", json=other, headers=headers),
        409,
        "idempotency_key_reused",
        "Idempotency-Key",
    )
    assert first.json()["id"] in problem["detail"]
    assert keyed_env.job_count() == 1 and len(keyed_env.queue.calls) == 1


def test_idempotency_keys_are_per_api_key(keyed_env: Env) -> None:
    _, a = new_key(keyed_env.db_url, name="a")
    _, b = new_key(keyed_env.db_url, name="b")
    spec = recipe_spec("sample:medical_qa")
    ids = {
        keyed_env.client.post(
            "/jobs", json=spec, headers={**bearer(k), "Idempotency-Key": "same"}
        ).json()["id"]
        for k in (a, b)
    }
    assert len(ids) == 2 and len(keyed_env.queue.calls) == 2


def test_a_refused_request_does_not_use_up_its_key(keyed_env: Env) -> None:
    _, key = new_key(keyed_env.db_url)
    headers = {**bearer(key), "Idempotency-Key": "fix-and-retry"}
    missing = keyed_env.allowed / "later.jsonl"
    bad = keyed_env.client.post("/jobs", json=recipe_spec(missing), headers=headers)
    assert_problem(bad, 422, "dataset_not_found", "training_dataset.name")
    tiny_dataset(missing)
    good = keyed_env.client.post("/jobs", json=recipe_spec(missing), headers=headers)
    assert good.status_code == 201, good.text
    assert "Idempotent-Replayed" not in good.headers


def test_concurrent_requests_with_one_key_create_one_job(sqlite_url: str) -> None:
    """The loser of the race meets the unique (scope, key) index and replays the winner's job."""
    spec = JobSpec.model_validate(recipe_spec("sample:medical_qa"))
    with session_scope(sqlite_url) as s:
        first, replayed = idempotency.create_job_once(s, spec, scope="key_a", key="k")
        assert not replayed
    with session_scope(sqlite_url) as s:
        # As if this request had checked for the key before the first one committed.
        second, replayed = idempotency.create_job_once(s, spec, scope="key_a", key="k")
        assert replayed and second.id == first.id
        assert len(jobs.list_jobs(s, limit=10)[0]) == 1
        changed = JobSpec.model_validate(recipe_spec("sample:medical_qa", seed=7))
        with pytest.raises(idempotency.IdempotencyKeyReused):
            idempotency.create_job_once(s, changed, scope="key_a", key="k")


def test_an_overlong_idempotency_key_is_refused(keyed_env: Env) -> None:
    _, key = new_key(keyed_env.db_url)
    headers = {**bearer(key), "Idempotency-Key": "x" * 256}
    response = keyed_env.client.post(
        "/jobs", json=recipe_spec("sample:medical_qa"), headers=headers
    )
    assert_problem(response, 422, "out_of_range", None)
    assert keyed_env.job_count() == 0


# --- rate limits -------------------------------------------------------------------------------


def test_job_creation_is_limited_per_key_with_retry_after(keyed_env: Env) -> None:
    _, a = new_key(keyed_env.db_url, name="a")
    _, b = new_key(keyed_env.db_url, name="b")
    spec = recipe_spec("sample:medical_qa")
    for _ in range(2):
        assert keyed_env.client.post("/jobs", json=spec, headers=bearer(a)).status_code == 201
    limited = keyed_env.client.post("/jobs", json=spec, headers=bearer(a))
    assert_problem(limited, 429, "rate_limited", None)
    retry_after = int(limited.headers["Retry-After"])
    assert 1 <= retry_after <= 30  # 2 per minute: one token every 30 s
    assert keyed_env.job_count() == 2 and len(keyed_env.queue.calls) == 2
    # Another key has its own bucket.
    assert keyed_env.client.post("/jobs", json=spec, headers=bearer(b)).status_code == 201


def test_inference_is_limited_per_key(keyed_env: Env) -> None:
    _, key = new_key(keyed_env.db_url)
    job = keyed_env.client.post(
        "/jobs", json=recipe_spec("sample:medical_qa"), headers=bearer(key)
    ).json()
    body = {"job_id": job["id"], "question": "Fever?", "use_adapter": False}
    assert keyed_env.client.post("/infer", json=body, headers=bearer(key)).status_code == 200
    limited = keyed_env.client.post("/infer", json=body, headers=bearer(key))
    assert_problem(limited, 429, "rate_limited", None)
    assert int(limited.headers["Retry-After"]) == 60
    preview = keyed_env.client.post("/datasets/preview", json={}, headers=bearer(key))
    assert_problem(preview, 429, "rate_limited", None)
    assert [c.name for c in keyed_env.queue.calls].count("medtune.infer") == 1


def test_token_bucket_refills_with_time() -> None:
    now = [1000.0]
    limiter = RateLimiter(clock=lambda: now[0])
    for _ in range(3):
        limiter.hit("jobs", "k", per_minute=3, what="jobs")
    with pytest.raises(RateLimited) as refused:
        limiter.hit("jobs", "k", per_minute=3, what="jobs")
    assert refused.value.retry_after_s == 20 and refused.value.status == 429
    now[0] += 19.0
    with pytest.raises(RateLimited) as refused:
        limiter.hit("jobs", "k", per_minute=3, what="jobs")
    assert refused.value.retry_after_s == 1
    now[0] += 1.0
    limiter.hit("jobs", "k", per_minute=3, what="jobs")  # one token back after 20 s
    limiter.hit("jobs", "other", per_minute=3, what="jobs")
    for _ in range(50):
        limiter.hit("jobs", "k", per_minute=0, what="jobs")  # 0: no limit


def test_principal_scopes_separate_anonymous_and_env_admin() -> None:
    assert auth.ANONYMOUS.scope != auth.ENV_ADMIN.scope
    assert auth.ANONYMOUS.job_owner is None and auth.ENV_ADMIN.job_owner is None
