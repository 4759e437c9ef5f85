"""Admission control (api/admission.py): a bounded number of requests before their responses
start, the rest waiting on the event loop; and the lock-up it prevents, against a live API."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from api.admission import AdmissionLimit
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from tests.api.test_auth import bearer, new_key
from tests.conftest import Stack, free_port, stack_env, start_api, wait_healthy


class Gate:
    """An ASGI app whose requests block until released, counting how many are inside."""

    def __init__(self, *, stream: bool = False) -> None:
        self.inside = self.most = 0
        self.release = asyncio.Event()
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/free":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"free"})
            return
        self.inside += 1
        self.most = max(self.most, self.inside)
        if self.stream:  # headers first, then the body once released (an SSE stream)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await self.release.wait()
            self.inside -= 1
            await send({"type": "http.response.body", "body": b"done"})
            return
        await self.release.wait()
        self.inside -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})


async def inside(gate: Gate, count: int) -> None:
    """Wait (polling, up to 10 s) until ``count`` requests are inside: a loaded machine may take
    longer than any fixed sleep to start them."""
    for _ in range(1000):
        if gate.inside >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{gate.inside} requests inside, expected {count}")


def _client(app: AdmissionLimit) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def test_no_more_than_the_limit_run_at_once_and_the_rest_wait_their_turn() -> None:
    asyncio.run(_no_more_than_the_limit_run_at_once_and_the_rest_wait_their_turn())


async def _no_more_than_the_limit_run_at_once_and_the_rest_wait_their_turn() -> None:
    gate = Gate()
    async with _client(AdmissionLimit(gate, limit=2, wait_s=5)) as client:
        calls = [asyncio.create_task(client.get("/slow")) for _ in range(5)]
        await inside(gate, 2)
        await asyncio.sleep(0.2)  # time for a third to get in, if the limit let it
        assert gate.inside == 2  # three wait outside, holding nothing
        gate.release.set()
        responses = await asyncio.gather(*calls)
    assert [r.status_code for r in responses] == [200] * 5
    assert gate.most == 2


def test_a_request_that_waits_too_long_gets_a_503_problem() -> None:
    asyncio.run(_a_request_that_waits_too_long_gets_a_503_problem())


async def _a_request_that_waits_too_long_gets_a_503_problem() -> None:
    gate = Gate()
    async with _client(AdmissionLimit(gate, limit=1, wait_s=0.2)) as client:
        first = asyncio.create_task(client.get("/slow"))
        await inside(gate, 1)
        response = await client.get("/slow")
        gate.release.set()
        assert (await first).status_code == 200
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "2"
    body = response.json()
    assert (body["code"], body["status"]) == ("server_busy", 503)


def test_a_started_stream_gives_its_slot_back() -> None:
    asyncio.run(_a_started_stream_gives_its_slot_back())


async def _a_started_stream_gives_its_slot_back() -> None:
    gate = Gate(stream=True)
    async with _client(AdmissionLimit(gate, limit=1, wait_s=0.5)) as client:
        stream = asyncio.create_task(client.get("/slow"))
        await inside(gate, 1)  # the stream is open, its body not yet sent
        free = await client.get("/free")  # would time out (503) if the stream kept its slot
        assert (free.status_code, free.text) == (200, "free")
        gate.release.set()
        assert (await stream).text == "done"


@pytest.mark.slow
def test_many_concurrent_pollers_all_get_answers(
    tmp_path: Path, migrated_pg: str, model_cache: Path
) -> None:
    """The soak's lock-up (BENCHMARKS.md): 200 pollers with keys left every thread waiting for
    a pooled connection held by a request waiting for a thread. Here 160 pollers must all be
    answered, none with an error."""
    with session_scope(migrated_pg) as s:
        job_id = jobs.create_job(s, JobSpec(), owner_key_id=None).id
    _, key = new_key(migrated_pg, name="poller", admin=True)
    stack = Stack(url="", home=tmp_path)
    port = free_port()
    stack.url = f"http://127.0.0.1:{port}"
    env = stack_env(tmp_path, model_cache, database_url=migrated_pg, auth="required")
    start_api(stack, port, env)
    try:
        wait_healthy(stack)

        async def poll(client: httpx.AsyncClient) -> list[int]:
            codes = []
            for _ in range(4):
                r = await client.get(f"/jobs/{job_id}/metrics", headers=bearer(key))
                codes.append(r.status_code)
            return codes

        async def main() -> list[int]:
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
            timeout = httpx.Timeout(120)
            async with httpx.AsyncClient(
                base_url=stack.url, limits=limits, timeout=timeout
            ) as client:
                results = await asyncio.gather(*(poll(client) for _ in range(160)))
            return [code for codes in results for code in codes]

        codes = asyncio.run(main())
    finally:
        stack.stop()
    assert codes.count(200) == len(codes) == 640, (
        json.dumps({str(c): codes.count(c) for c in set(codes)}) + stack.tail_logs()
    )
