"""Schemathesis against the live OpenAPI schema: no 5xx, and every 4xx a problem+json body.

The app runs in-process (ASGI) with authentication required and a real API key, on a migrated
job store: SQLite, and a fresh Postgres database (the production store; it refuses NUL in text,
which SQLite takes). Its queue is a recording fake: jobs the fuzzer creates are stored and
"sent", but nothing consumes them, so no training starts. Every operation in ``/openapi.json``
is fuzzed with schema-valid (positive) and schema-violating (negative) requests, first with
generated path parameters, then with ``job_id`` fixed to a finished job of the key's own, so
the handlers past the 404 run too. About 2,300 requests per store; the test asserts at least
``MIN_REQUESTS``. The requests are generated once, by the first store's run, and the second
store gets the same ones (generation is most of the time). Regressions it found are pinned by
the fast tests at the end.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from api.problems import _VALIDATION_CODES, DOCS, PROBLEM
from core.queue import INFER_TASK, PREVIEW_TASK, RUN_JOB_TASK
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from tests.api.in_process import FakeQueue, FakeResult
from tests.api.test_auth import bearer, build, new_key
from tests.conftest import PG_ADMIN
from tests.helpers import recipe_spec

ROOT = Path(__file__).resolve().parents[2]
# Examples per operation, generation mode and pass (generated / fixed job_id). The inputs are
# the same every run (derandomized) unless MEDTUNE_FUZZ_RANDOM=1 asks for new ones.
EXAMPLES = int(os.environ.get("MEDTUNE_FUZZ_EXAMPLES", "40"))
RANDOM = os.environ.get("MEDTUNE_FUZZ_RANDOM") == "1"
MIN_REQUESTS = 2000
CODE_SHAPE = re.compile(r"^[a-z][a-z0-9_]{2,63}$")


def known_codes() -> set[str]:
    """Every problem code the source names: error classes, raise sites, validation codes.

    A code a client sees must be one of these literals, never text built from the input.
    """
    codes = set(_VALIDATION_CODES.values()) | {"invalid_value", "not_found", "http_error"}
    codes |= {"method_not_allowed"}
    literal = re.compile(r"""\bcode\s*[=:]\s*["']([a-z][a-z0-9_]+)["']""")
    for folder in ("api", "core"):
        for path in (ROOT / folder).rglob("*.py"):
            codes |= set(literal.findall(path.read_text()))
    return codes


PREVIEW_REPLY = {
    "format": "records",
    "layout": "question_answer",
    "chat_template": "chatml",
    "end_of_turn_token": "<|im_end|>",
    "dropped": {},
    "examples": [],
    "problems": [],
}


@dataclass
class FuzzQueue(FakeQueue):
    """Records every task and runs none; answers previews and inferences like a worker would."""

    names: Counter[str] = field(default_factory=Counter)

    def send_task(
        self,
        name: str,
        args: list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> FakeResult:
        self.names[name] += 1
        return self.answer(kwargs, PREVIEW_REPLY if name == PREVIEW_TASK else self.reply)


@dataclass
class Tally:
    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    codes_seen: Counter[str] = field(default_factory=Counter)


@dataclass
class Target:
    app: FastAPI
    queue: FuzzQueue
    key: str
    finished_job: str


@pytest.fixture
def private_pg() -> Iterator[str]:
    """A migrated Postgres database of this test's own, dropped at the end."""
    import psycopg

    from core.store.db import get_engine
    from core.store.migrate import upgrade

    name = f"medtune_fuzz_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        get_engine(url).dispose()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    fixture = "sqlite_url" if request.param == "sqlite" else "private_pg"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def target(db_url: str, tmp_path: Path) -> Iterator[Target]:
    queue = FuzzQueue()
    # Rate limits off: the fuzzer should reach the handlers, not the 429 (tested elsewhere).
    app = build(db_url, tmp_path / "home", queue, rate_jobs_per_minute=0, rate_infer_per_minute=0)
    _, key = new_key(db_url, name="fuzz")
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        response = client.post("/jobs", json=recipe_spec("sample:medical_qa"), headers=bearer(key))
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
    with session_scope(db_url) as s:
        assert jobs.claim(s, job_id, worker="fuzz")
        rows = [{"step": n, "loss": 2.0 / n, "learning_rate": 1e-4} for n in range(1, 6)]
        jobs.add_metrics(s, job_id, rows)
        jobs.finish(s, job_id, JobStatus.succeeded)
    yield Target(app=app, queue=queue, key=key, finished_job=job_id)


def check(response: Any, label: str, curl: str, tally: Tally, codes: set[str]) -> None:
    status = response.status_code
    tally.requests += 1
    tally.by_status[status] += 1
    where = f"{label} -> {status}\n  {curl[:500]}\n  {response.text[:300]}"
    if status >= 500:
        tally.failures.append("server error: " + where)
        return
    if status < 400:
        return
    content_type = response.headers.get("content-type", [""])[0]
    if content_type != PROBLEM:
        tally.failures.append(f"not problem+json ({content_type}): " + where)
        return
    body = response.json()
    code = body.get("code")
    ok = (
        isinstance(code, str)
        and CODE_SHAPE.fullmatch(code)
        and code in codes
        and body.get("status") == status
        and body.get("type") == DOCS + code
        and isinstance(body.get("title"), str)
        and isinstance(body.get("detail"), str)
        and body["detail"]
    )
    if not ok:
        tally.failures.append("malformed problem: " + where)
        return
    tally.codes_seen[code] += 1


def fuzz_operation(
    operation: Any,
    mode: GenerationMode,
    *,
    key: str,
    tally: Tally,
    codes: set[str],
    path_parameters: dict[str, str] | None = None,
    query: dict[str, Any] | None = None,
) -> None:
    strategy = operation.as_strategy(
        generation_mode=mode, path_parameters=path_parameters, query=query
    )

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=not RANDOM,  # the same requests every run: a failure reproduces
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        label = f"{mode.value} {operation.label}"
        try:
            response = case.call(headers=bearer(key))
        except Exception as exc:  # the in-process client re-raises what would be a 500
            tally.requests += 1
            tally.failures.append(
                f"server error: {label} raised {exc!r:.300}\n  {case.as_curl_command()[:500]}"
            )
            return
        check(response, label, case.as_curl_command(), tally, codes)

    try:
        run()
    except Unsatisfiable:
        # Nothing to violate (no parameters, or only a free-form string path parameter).
        assert mode == GenerationMode.NEGATIVE, operation.label


def send(case: Any, label: str, *, key: str, tally: Tally, codes: set[str], app: Any) -> None:
    """What ``run`` in fuzz_operation does with a case, to ``app``."""
    try:
        response = case.call(headers=bearer(key), app=app)
    except Exception as exc:  # the in-process client re-raises what would be a 500
        tally.requests += 1
        tally.failures.append(
            f"server error: {label} raised {exc!r:.300}\n  {case.as_curl_command()[:500]}"
        )
        return
    check(response, label, case.as_curl_command(), tally, codes)


@dataclass
class Sent:
    """A generated request, kept so the other store gets the same one."""

    label: str
    case: Any
    fixed_job_id: bool  # its job_id is the finished job's: the other store's is put in


# Generating the requests is most of the fuzz's time, and (derandomized) it generates the same
# ones for both stores: the first store's run keeps them here, the second sends them again.
GENERATED: list[Sent] = []


def fuzz_all(operations: list[Any], target: Target, tally: Tally, codes: set[str]) -> None:
    """Every operation, both modes, with generated and then fixed path parameters."""
    sent: list[Sent] = []
    now = Sent(label="", case=None, fixed_job_id=False)  # what is being fuzzed

    # Each case, as run() sends it (recorded here, not in run(): derandomized generation is seeded
    # from run's source, so the requests stay the ones the fuzz has always sent).
    def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
        sent.append(Sent(now.label, case, fixed_job_id=now.fixed_job_id))

    schemathesis.hook(before_call)
    try:
        fuzz_each(operations, target, tally, codes, now)
    finally:
        schemathesis.hooks.unregister(before_call)
    assert len(sent) == tally.requests, (len(sent), tally.requests)  # each case sent once
    GENERATED[:] = sent  # only a whole run's requests


def fuzz_each(
    operations: list[Any], target: Target, tally: Tally, codes: set[str], now: Sent
) -> None:
    for operation in operations:
        has_job_id = "{job_id}" in operation.path
        passes: list[dict[str, Any]] = [{}]
        if has_job_id:
            fixed: dict[str, Any] = {"path_parameters": {"job_id": target.finished_job}}
            if operation.path.endswith("/events") and not operation.path.startswith("/v1"):
                # The SSE stream sleeps poll_seconds between reads; keep the fuzz fast.
                fixed["query"] = {"poll_seconds": 0.01}
            passes.append(fixed)
        for extra in passes:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                now.label, now.fixed_job_id = f"{mode.value} {operation.label}", bool(extra)
                fuzz_operation(operation, mode, key=target.key, tally=tally, codes=codes, **extra)


def replay(target: Target, tally: Tally, codes: set[str]) -> None:
    """The requests the other store's run generated, to this store's app with its key."""
    for request in GENERATED:
        if request.fixed_job_id:
            request.case.path_parameters["job_id"] = target.finished_job
        send(request.case, request.label, key=target.key, tally=tally, codes=codes, app=target.app)


@pytest.mark.slow
def test_every_operation_answers_without_5xx_and_with_problem_json(target: Target) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", target.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]
    codes = known_codes()
    tally = Tally()
    if GENERATED:  # the other store's run generated them
        replay(target, tally, codes)
    else:
        fuzz_all(operations, target, tally, codes)
    summary = f"{tally.requests} requests, statuses {dict(sorted(tally.by_status.items()))}"
    assert not tally.failures, f"{len(tally.failures)} failures ({summary}):\n" + "\n".join(
        tally.failures[:20]
    )
    assert tally.requests >= MIN_REQUESTS, summary
    # The fuzz reached past validation: jobs were created (and only recorded, never run), and
    # the finished job's own pages answered.
    assert tally.by_status[201] > 0 and tally.by_status[200] > 0, summary
    assert set(target.queue.names) <= {RUN_JOB_TASK, INFER_TASK, PREVIEW_TASK}
    print(summary, "codes", dict(tally.codes_seen.most_common()))


# --- what the fuzz found, pinned -------------------------------------------------------------


@pytest.fixture
def fast(db_url: str, tmp_path: Path) -> Iterator[tuple[Any, str, str]]:
    """(client, key, finished job id) on the same app as the fuzz, without the fuzz."""
    from fastapi.testclient import TestClient

    app = build(db_url, tmp_path / "home", FuzzQueue())
    _, key = new_key(db_url, name="pinned")
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/jobs", json=recipe_spec("sample:medical_qa"), headers=bearer(key))
        job_id = response.json()["id"]
        with session_scope(db_url) as s:
            assert jobs.claim(s, job_id, worker="pinned")
            jobs.add_metrics(s, job_id, [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}])
            jobs.finish(s, job_id, JobStatus.succeeded)
        yield client, key, job_id


def problem_of(response: Any, status: int, code: str, field: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert (body["code"], body.get("field")) == (code, field), body
    return body


def test_a_step_beyond_the_store_is_a_422_not_an_overflow(fast: tuple[Any, str, str]) -> None:
    client, key, job_id = fast
    for path in (f"/jobs/{job_id}/metrics", f"/jobs/{job_id}/events"):
        response = client.get(path, params={"after_step": 2**63}, headers=bearer(key))
        problem_of(response, 422, "out_of_range", "after_step")
    ok = client.get(
        f"/jobs/{job_id}/metrics", params={"after_step": 2**31 - 1}, headers=bearer(key)
    )
    assert ok.status_code == 200 and ok.json()["data"] == []


@pytest.mark.parametrize(
    ("last_event_id", "steps"),
    [
        ("\u00b2", ["1", "2"]),  # str.isdigit() is True for it, int() is not
        ("99999999999999999999999", ["1", "2"]),
        ("-1", ["1", "2"]),
        ("x", ["1", "2"]),
        ("1", ["2"]),
        ("4294967295", []),  # past the last step the store can hold: nothing after it
    ],
)
def test_a_malformed_last_event_id_is_ignored(
    fast: tuple[Any, str, str], last_event_id: str, steps: list[str]
) -> None:
    """A header that is not 1-10 ASCII digits counts as absent (it used to 500)."""
    client, key, job_id = fast
    headers = {**bearer(key), "Last-Event-ID": last_event_id.encode("latin-1")}
    response = client.get(f"/jobs/{job_id}/events", params={"poll_seconds": 0.01}, headers=headers)
    assert response.status_code == 200, response.text
    assert re.findall(r"^id: (\d+)$", response.text, flags=re.M) == steps


@pytest.mark.parametrize(
    ("path", "headers", "field"),
    [
        ("/jobs/job_a%00b", {}, "path"),
        ("/jobs/job_a%00b/metrics", {}, "path"),
        ("/v1/fine_tuning/jobs/ftjob-%00", {}, "path"),
        ("/jobs?cursor=a%00b", {}, "cursor"),
        ("/v1/fine_tuning/jobs?after=a%00", {}, "after"),
        ("/jobs", {"X-Anything": "a\x00b"}, "x-anything"),
    ],
)
def test_nul_in_the_url_or_a_header_is_a_400_problem(
    fast: tuple[Any, str, str], path: str, headers: dict[str, str], field: str
) -> None:
    """Postgres text cannot hold NUL: these reached the driver and came back as a plain 500."""
    client, key, _ = fast
    response = client.get(path, headers={**bearer(key), **headers})
    body = problem_of(response, 400, "invalid_characters", field)
    assert "NUL" in body["detail"]


def test_nul_in_an_idempotency_key_or_a_body_id_is_a_problem(fast: tuple[Any, str, str]) -> None:
    client, key, _ = fast
    spec = recipe_spec("sample:medical_qa")
    headers = {**bearer(key), "Idempotency-Key": "a\x00b"}
    problem_of(
        client.post("/jobs", json=spec, headers=headers),
        400,
        "invalid_characters",
        "idempotency-key",
    )
    body = {"job_id": "job_\u0000", "question": "What is anemia?"}
    problem_of(
        client.post("/infer", json=body, headers=bearer(key)), 404, "job_not_found", "job_id"
    )


def test_an_unparsable_body_names_the_body_and_the_fix(fast: tuple[Any, str, str]) -> None:
    client, key, _ = fast
    headers = {**bearer(key), "Content-Type": "application/json"}
    response = client.post("/infer", content=b"\x02!\xff:", headers=headers)
    body = problem_of(response, 400, "invalid_body", "body")
    assert "UTF-8 JSON" in body["detail"]


def test_an_open_event_stream_holds_no_pooled_connection(db_url: str, tmp_path: Path) -> None:
    """Found by bench/load_soak.py: 50 SSE listeners held 50 connections of a pool of 30, and
    every other request waited 30 s for one and failed with a 500."""
    from fastapi.testclient import TestClient

    from core.store.db import get_engine

    app = build(db_url, tmp_path / "home", FuzzQueue())
    _, key = new_key(db_url, name="sse")
    with TestClient(app) as client:
        response = client.post("/jobs", json=recipe_spec("sample:medical_qa"), headers=bearer(key))
        job_id = response.json()["id"]
        with session_scope(db_url) as s:
            assert jobs.claim(s, job_id, worker="sse")  # running: the stream stays open
        pool = get_engine(db_url).pool
        params = {"poll_seconds": 0.2}
        with client.stream(
            "GET", f"/jobs/{job_id}/events", params=params, headers=bearer(key)
        ) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("retry:")
            while not next(lines).startswith("event: status"):
                pass
            # Between polls nothing is checked out (during one, the poll's own session is).
            samples = []
            for _ in range(40):
                samples.append(pool.checkedout())  # type: ignore[attr-defined]
                time.sleep(0.02)
            assert 0 in samples, samples
