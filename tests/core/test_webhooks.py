"""Webhooks against a real HTTP receiver on loopback: signed, retried with backoff, recorded,
bounded; private targets refused at submit and at send time."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.deps import get_queue
from api.main import create_app
from core import webhooks
from core.settings import Settings, get_settings
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from tests.api.in_process import FakeQueue, assert_problem
from tests.helpers import recipe_spec

SECRET = "whsec_" + base64.b64encode(b"a test secret of 24 bytes").decode()


@dataclass
class Receiver:
    """Answers each POST with the next of ``statuses`` (then 200) and keeps what it got."""

    statuses: list[int]
    got: list[tuple[dict[str, str], bytes, float]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(statuses=[])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            state.got.append(({k.lower(): v for k, v in self.headers.items()}, body, time.time()))
            self.send_response(state.statuses.pop(0) if state.statuses else 200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    yield state
    server.shutdown()


def verify(
    headers: dict[str, str], body: bytes, secret: str, received: float | None = None
) -> None:
    """What a receiver does (Standard Webhooks): HMAC-SHA256 of id.timestamp.body, and a
    timestamp close to when it arrived."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    version, signature = headers["webhook-signature"].split(",", 1)
    assert version == "v1" and hmac.compare_digest(signature, expected)
    assert abs((received or time.time()) - int(headers["webhook-timestamp"])) < 60


def settings_for(url: str, home: Path, **values: Any) -> Settings:
    values = {"webhook_allow_private": True, "webhook_backoff_s": 0.2, **values}
    return Settings(_env_file=None, database_url=url, home=home, **values)  # type: ignore[call-arg]


def finished_job(url: str, hook_url: str, status: JobStatus = JobStatus.succeeded) -> str:
    spec = {**recipe_spec("sample:medical_qa"), "webhook": {"url": hook_url, "secret": SECRET}}
    with session_scope(url) as s:
        job = jobs.create_job(s, JobSpec.model_validate(spec))
        assert job.webhook_state == "pending"
        assert jobs.claim(s, job.id, worker="w")
        jobs.finish(s, job.id, status, error_code="dataset_invalid", error_message="bad rows")
        return job.id


def deliver_until_settled(url: str, settings: Settings, job_id: str, timeout_s: float = 20) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        with session_scope(url) as s:
            webhooks.deliver_due(s, settings)
            job = jobs.get_job(s, job_id)
            if job.webhook_state != "pending":
                return job
        assert time.monotonic() < deadline, job.webhook_delivery
        time.sleep(0.05)


def test_a_receiver_failing_twice_gets_the_signed_event_on_the_third_attempt(
    sqlite_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    receiver.statuses = [500, 503]
    settings = settings_for(sqlite_url, tmp_path)
    job_id = finished_job(sqlite_url, receiver.url, JobStatus.failed)
    job = deliver_until_settled(sqlite_url, settings, job_id)

    assert job.webhook_state == "delivered"
    assert job.status == JobStatus.failed and job.error_code == "dataset_invalid"  # untouched
    record = job.webhook_delivery
    assert record["attempts"] == 3 and record["last_status"] == 200 and record["delivered_at"]
    assert record["type"] == "job.failed" and record["last_error"] is None
    assert len(receiver.got) == 3
    ids = {headers["webhook-id"] for headers, _, _ in receiver.got}
    assert ids == {record["event_id"]}  # one event, retried: a receiver drops repeats by id
    gaps = [b[2] - a[2] for a, b in zip(receiver.got, receiver.got[1:], strict=False)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4  # backoff doubles
    for headers, body, received in receiver.got:
        verify(headers, body, SECRET, received)
        event = json.loads(body)
        assert event["object"] == "event" and event["type"] == "job.failed"
        assert event["id"] == record["event_id"] and isinstance(event["created_at"], int)
        assert event["data"]["id"] == job_id and event["data"]["status"] == "failed"
        assert event["data"]["error"]["code"] == "dataset_invalid"
    with pytest.raises(AssertionError):
        verify(receiver.got[0][0], receiver.got[0][1] + b" ", SECRET)  # a changed body fails


def test_a_receiver_that_never_answers_2xx_is_given_up_after_the_bound(
    sqlite_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    receiver.statuses = [500] * 100
    settings = settings_for(sqlite_url, tmp_path, webhook_retry_s=1.0)
    job_id = finished_job(sqlite_url, receiver.url)
    job = deliver_until_settled(sqlite_url, settings, job_id)
    assert job.webhook_state == "failed" and job.webhook_delivery["last_error"] == "HTTP 500"
    assert 2 <= job.webhook_delivery["attempts"] == len(receiver.got) <= 4
    assert job.status == JobStatus.succeeded


def test_a_private_target_is_refused_again_at_send_time(
    sqlite_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    job_id = finished_job(sqlite_url, receiver.url)  # stored as if the flag had been set
    settings = settings_for(sqlite_url, tmp_path, webhook_allow_private=False)
    job = deliver_until_settled(sqlite_url, settings, job_id)
    assert job.webhook_state == "failed"
    assert job.webhook_delivery["last_error"] == "webhook_url_private"
    assert receiver.got == []


def test_a_stored_url_httpx_cannot_send_fails_once_and_is_not_retried(
    sqlite_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    """A job stored before submission refused such URLs: its delivery ends at the first
    attempt with the submission's code, instead of raising out of every attempt."""
    job_id = finished_job(sqlite_url, receiver.url + "/a\nb")
    settings = settings_for(sqlite_url, tmp_path)
    job = deliver_until_settled(sqlite_url, settings, job_id)
    assert job.webhook_state == "failed" and job.webhook_delivery["attempts"] == 1
    assert job.webhook_delivery["last_error"] == "webhook_url_invalid"
    assert receiver.got == []


def test_a_running_job_sends_nothing_until_it_ends(
    sqlite_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    settings = settings_for(sqlite_url, tmp_path)
    spec = {**recipe_spec("sample:medical_qa"), "webhook": {"url": receiver.url, "secret": SECRET}}
    with session_scope(sqlite_url) as s:
        job = jobs.create_job(s, JobSpec.model_validate(spec))
        assert webhooks.deliver_due(s, settings) == []
        jobs.request_cancel(s, job.id)  # queued: cancelled now
    job = deliver_until_settled(sqlite_url, settings, job.id)
    assert job.webhook_state == "delivered" and job.webhook_delivery["type"] == "job.cancelled"
    assert json.loads(receiver.got[0][1])["type"] == "job.cancelled"


def _client(url: str, home: Path, **values: Any) -> TestClient:
    app = create_app()
    settings = Settings(_env_file=None, database_url=url, home=home, auth="disabled", **values)  # type: ignore[call-arg]
    app.dependency_overrides[get_settings] = lambda: settings
    app.dependency_overrides[get_queue] = lambda: FakeQueue()
    return TestClient(app)


@pytest.mark.parametrize(
    ("hook_url", "code"),
    [
        ("http://127.0.0.1:9/hooks", "webhook_url_private"),
        ("http://[::1]/x", "webhook_url_private"),
        ("http://10.0.0.7/x", "webhook_url_private"),
        ("http://169.254.169.254/latest/meta-data", "webhook_url_private"),
        ("http://localhost/x", "webhook_url_private"),
        ("ftp://example.com/x", "webhook_url_invalid"),
        ("https://user:pw@example.com/x", "webhook_url_invalid"),
        ("not a url", "webhook_url_invalid"),
        ("https://example.com/a\nb", "webhook_url_invalid"),  # httpx could not send it
        ("https://example.com:99999/x", "webhook_url_invalid"),
        ("https://no-such-host.invalid/x", "webhook_url_unresolvable"),
    ],
)
def test_submit_refuses_targets(sqlite_url: str, tmp_path: Path, hook_url: str, code: str) -> None:
    spec = {**recipe_spec("sample:medical_qa"), "webhook": {"url": hook_url, "secret": SECRET}}
    with _client(sqlite_url, tmp_path) as client:
        assert_problem(client.post("/jobs", json=spec), 422, code, "webhook.url")


def test_submit_with_the_flag_stores_it_and_masks_the_secret(
    sqlite_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    spec = {**recipe_spec("sample:medical_qa"), "webhook": {"url": receiver.url, "secret": SECRET}}
    with _client(sqlite_url, tmp_path, webhook_allow_private=True) as client:
        made = client.post("/jobs", json=spec)
        assert made.status_code == 201, made.text
        job = client.get(f"/jobs/{made.json()['id']}").json()
        assert job["webhook"] == {"state": "pending"}
        assert job["spec"]["webhook"] == {"url": receiver.url, "secret": "********"}
        assert SECRET not in made.text + json.dumps(job)
        short = {**spec, "webhook": {"url": receiver.url, "secret": "short"}}
        assert_problem(client.post("/jobs", json=short), 422, "out_of_range", "webhook.secret")


NAME = "hooks.medtune.invalid"  # no real DNS answers it: only the faked lookup does
PUBLIC = "93.184.215.14"  # a global address; tests refuse every connection to it


def fake_dns(monkeypatch: pytest.MonkeyPatch, *answers: list[str]) -> None:
    """``NAME`` resolves to the next of ``answers`` on each lookup (the last one from then on);
    an empty answer fails as an unknown name does. Other hosts resolve for real."""
    real = socket.getaddrinfo
    left = list(answers)

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != NAME:
            return real(host, port, *args, **kwargs)
        found = left.pop(0) if len(left) > 1 else left[0]
        if not found:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, int(port or 0), 0, 0))
            if ":" in a
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, int(port or 0)))
            for a in found
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Where sockets connect; any address but loopback is refused, so nothing leaves the host."""
    real = socket.create_connection
    seen: list[tuple[str, int]] = []

    def create_connection(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        seen.append(address)
        if address[0] not in ("127.0.0.1", "localhost", NAME):
            raise ConnectionRefusedError(111, "Connection refused")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    return seen


def test_a_delivery_connects_to_the_checked_address_with_the_url_s_host(
    sqlite_url: str, tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = int(receiver.url.rsplit(":", 1)[1].split("/")[0])
    fake_dns(monkeypatch, ["127.0.0.1"], [])  # a second lookup would fail
    job_id = finished_job(sqlite_url, f"http://{NAME}:{port}/hooks?x=1")
    with session_scope(sqlite_url) as s:
        [record] = webhooks.deliver_due(s, settings_for(sqlite_url, tmp_path))
    assert record["last_error"] is None and record["delivered_at"], record
    [(headers, body, _)] = receiver.got
    assert headers["host"] == f"{NAME}:{port}"
    verify(headers, body, SECRET)
    assert json.loads(body)["data"]["id"] == job_id


def test_a_name_rebound_to_loopback_after_the_check_is_not_connected_to(
    sqlite_url: str, tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = int(receiver.url.rsplit(":", 1)[1].split("/")[0])
    fake_dns(monkeypatch, [PUBLIC], ["127.0.0.1"])  # public to the check, inward after it
    seen = connections(monkeypatch)
    finished_job(sqlite_url, f"http://{NAME}:{port}/hooks")
    settings = settings_for(sqlite_url, tmp_path, webhook_allow_private=False)
    with session_scope(sqlite_url) as s:
        [record] = webhooks.deliver_due(s, settings)
    assert receiver.got == []
    assert seen == [(PUBLIC, port)]
    assert record["last_error"].startswith("ConnectError") and "delivered_at" not in record


@pytest.mark.parametrize(
    ("address", "netloc"),
    [(PUBLIC, PUBLIC), ("2606:4700:4700::1111", "[2606:4700:4700::1111]")],
)
def test_an_https_delivery_keeps_the_name_for_tls(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, address: str, netloc: str
) -> None:
    fake_dns(monkeypatch, [address])
    sent: list[httpx.Request] = []

    def send(client: httpx.Client, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        sent.append(request)
        return httpx.Response(204, request=request)

    monkeypatch.setattr(httpx.Client, "send", send)
    finished_job(sqlite_url, f"https://{NAME.upper()}:8443/hooks")
    settings = settings_for(sqlite_url, tmp_path, webhook_allow_private=False)
    with session_scope(sqlite_url) as s:
        [record] = webhooks.deliver_due(s, settings)
    assert record["last_status"] == 204 and record["delivered_at"]
    [request] = sent
    assert str(request.url) == f"https://{netloc}:8443/hooks"
    assert request.headers["host"] == f"{NAME}:8443"
    assert request.extensions["sni_hostname"] == NAME  # SNI and the certificate check


def test_a_connect_error_tries_the_next_address_and_other_errors_end_the_attempt(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    second = "1.1.1.1"
    fake_dns(monkeypatch, [PUBLIC, second])
    sent: list[str] = []
    failures: dict[str, Exception] = {}

    def send(client: httpx.Client, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        sent.append(request.url.host)
        if request.url.host in failures:
            raise failures[request.url.host]
        return httpx.Response(200, request=request)

    monkeypatch.setattr(httpx.Client, "send", send)
    settings = settings_for(sqlite_url, tmp_path, webhook_allow_private=False)
    failures[PUBLIC] = httpx.ConnectError("Connection refused")
    finished_job(sqlite_url, f"http://{NAME}/hooks")
    with session_scope(sqlite_url) as s:
        [record] = webhooks.deliver_due(s, settings)
    assert sent == [PUBLIC, second] and record["delivered_at"]

    sent.clear()
    failures[PUBLIC] = httpx.ReadTimeout("timed out")  # it may have arrived: not sent twice
    finished_job(sqlite_url, f"http://{NAME}/hooks")
    with session_scope(sqlite_url) as s:
        [record] = webhooks.deliver_due(s, settings)
    assert sent == [PUBLIC] and record["last_error"].startswith("ReadTimeout")
