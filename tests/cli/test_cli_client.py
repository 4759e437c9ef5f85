"""The client subcommands: ``python -m cli.main jobs ... / infer ...`` in a subprocess against the
live API + worker on Postgres and Redis, plus the client's parts that need no server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli.client import ApiError, MedtuneClient, ServerUnreachable
from cli.jobs import SpecFileError, read_spec, table
from cli.progress import StepRate, progress_bar
from tests.conftest import ROOT, Stack, free_port
from tests.helpers import recipe_spec, tiny_dataset


def medtune(
    *args: str, url: str | None, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it; ``url`` goes in MEDTUNE_URL (None: not set at all)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDTUNE_")}
    if url is not None:
        env["MEDTUNE_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


# --- no server needed -----------------------------------------------------------------------


def test_no_server_gives_a_clear_hint(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = medtune("jobs", "list", url=url)
    assert result.returncode == 2
    assert f"cannot reach the medtune API at {url}" in result.stderr
    assert "medtune up" in result.stderr and "MEDTUNE_URL" in result.stderr
    assert "Traceback" not in result.stderr
    # --url wins over MEDTUNE_URL.
    other = f"http://127.0.0.1:{free_port()}"
    result = medtune("jobs", "show", "job_x", "--url", other, url=url)
    assert result.returncode == 2 and other in result.stderr


def test_spec_file_errors_are_caught_before_any_request(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: a request would say so instead
    broken = tmp_path / "broken.json"
    broken.write_text('{"model_config": {"base_model": "x",}\n}')
    result = medtune("jobs", "create", "-f", str(broken), url=url)
    assert result.returncode == 2
    assert result.stderr.startswith("error invalid_json: ") and "line 1" in result.stderr
    result = medtune("jobs", "create", "-f", str(tmp_path / "missing.json"), url=url)
    assert result.returncode == 2 and result.stderr.startswith("error spec_not_found: ")
    result = medtune("jobs", "create", "-f", "-", url=url, stdin="[1, 2]")
    assert result.returncode == 2 and result.stderr.startswith("error invalid_spec: stdin")


def test_read_spec_reads_an_object(tmp_path: Path) -> None:
    assert read_spec(str(write_json(tmp_path / "s.json", {"a": 1}))) == {"a": 1}
    with pytest.raises(SpecFileError) as info:
        read_spec(str(write_json(tmp_path / "l.json", [1])))
    assert info.value.code == "invalid_spec"


def test_eta_comes_from_the_rows_own_timestamps() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    rate = StepRate(window=3)
    assert rate.eta(1, 10) is None
    # Rows replayed in one burst still carry the pace they were trained at: 2 s per step.
    for step in range(1, 6):
        stamp = t0 + timedelta(seconds=2 * step)
        rate.add({"step": step, "created_at": stamp.isoformat()})
    assert rate.seconds_per_step() == pytest.approx(2.0)
    assert rate.eta(5, 10) == pytest.approx(10.0)
    assert rate.eta(5, None) is None
    # The window forgets old pace: a slower stretch shows at once.
    for step in range(6, 9):
        stamp = t0 + timedelta(seconds=10 + 5 * (step - 5))
        rate.add({"step": step, "created_at": stamp.isoformat()})
    assert rate.seconds_per_step() == pytest.approx(5.0)


def test_progress_bar_and_table() -> None:
    assert progress_bar(5, 10, width=10) == "[#####-----]"
    assert progress_bar(12, 10, width=4) == "[####]"
    assert progress_bar(3, None, width=3) == "[???]"
    assert table([("a", None), ("long", 2)], ("X", "Y")).splitlines() == [
        "X     Y",
        "a     -",
        "long  2",
    ]


def test_client_maps_problems_and_other_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/jobs/job_x":
            return httpx.Response(
                404,
                json={"code": "job_not_found", "detail": "no job with id 'job_x'", "status": 404},
                headers={"content-type": "application/problem+json"},
            )
        return httpx.Response(502, text="<html>Bad gateway</html>")

    with MedtuneClient("http://medtune.test", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ApiError) as info:
            client.get_job("job_x")
        assert (info.value.status, info.value.code) == (404, "job_not_found")
        assert info.value.detail == "no job with id 'job_x'"
        with pytest.raises(ApiError) as info:
            client.list_jobs()
        assert info.value.code == "http_502" and "Bad gateway" in info.value.detail


def test_events_resume_from_the_last_step_after_a_dropped_stream() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("last-event-id"))
        if len(seen) == 1:  # the connection drops after step 1, with no end event
            body = 'id: 1\nevent: metric\ndata: {"step": 1}\n\n'
        else:
            body = (
                'id: 2\nevent: metric\ndata: {"step": 2}\n\n'
                'event: end\ndata: {"status": "succeeded"}\n\n'
            )
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    with MedtuneClient("http://medtune.test", transport=httpx.MockTransport(handler)) as client:
        events = list(client.events("job_x", backoff_s=0))
    assert [(e.event, e.id) for e in events] == [("metric", "1"), ("metric", "2"), ("end", None)]
    assert seen == [None, "1"]


def test_events_give_up_after_repeated_failures() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with (
        MedtuneClient("http://medtune.test", transport=httpx.MockTransport(handler)) as client,
        pytest.raises(ServerUnreachable),
    ):
        list(client.events("job_x", reconnects=2, backoff_s=0))


# --- against the live stack -----------------------------------------------------------------


def test_unknown_job_is_exit_2_with_the_code(pg_redis_stack: Stack) -> None:
    for args in (["jobs", "show"], ["jobs", "watch"], ["jobs", "cancel"], ["jobs", "metrics"]):
        result = medtune(*args, "job_doesnotexist", url=pg_redis_stack.url)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stderr.startswith("error job_not_found: "), result.stderr
    result = medtune("infer", "job_doesnotexist", "Hi?", url=pg_redis_stack.url)
    assert result.returncode == 2 and "error job_not_found: " in result.stderr


def test_a_spec_the_server_rejects_names_the_field(pg_redis_stack: Stack, tmp_path: Path) -> None:
    spec = recipe_spec("sample:medical_qa", learning_rate=-1)
    path = write_json(tmp_path / "s.json", spec)
    # --url without MEDTUNE_URL set.
    result = medtune("jobs", "create", "-f", str(path), "--url", pg_redis_stack.url, url=None)
    assert result.returncode == 2
    assert result.stderr.startswith("error out_of_range: training_config.learning_rate")
    spec = recipe_spec("sample:medical_qa")
    spec["lora_config"]["rank"] = 8
    result = medtune("jobs", "create", "-f", "-", url=pg_redis_stack.url, stdin=json.dumps(spec))
    assert result.returncode == 2
    assert result.stderr.startswith("error unknown_field: lora_config.rank")


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("cli")
    data = tiny_dataset(folder / "tiny.jsonl", rows=4)
    yield write_json(folder / "spec.json", recipe_spec(data, max_steps=2))


@pytest.mark.slow
def test_create_watch_infer_list(pg_redis_stack: Stack, spec_file: Path) -> None:
    url = pg_redis_stack.url
    created = medtune("jobs", "create", "-f", str(spec_file), "--json", url=url)
    assert created.returncode == 0, created.stderr
    job = json.loads(created.stdout)
    # An idle worker may claim it before the API reads the row back to answer.
    assert job["status"] in {"queued", "running"} and job["id"].startswith("job_")

    watched = medtune("jobs", "watch", job["id"], url=url, timeout=600)
    assert watched.returncode == 0, watched.stdout + watched.stderr + pg_redis_stack.tail_logs()
    lines = watched.stdout.splitlines()
    progress = [line for line in lines if "loss" in line and "ETA" in line]
    assert [re.search(r" (\d+/\d+) ", p)[1] for p in progress] == ["1/2", "2/2"], watched.stdout
    assert all("tok/s" in p and "ETA" in p for p in progress)
    assert "[succeeded]" in lines  # the status events (earlier ones depend on when it attached)
    assert lines[-1].startswith(f"job {job['id']} succeeded: 2/2 steps")

    shown = medtune("jobs", "show", job["id"], url=url)
    assert shown.returncode == 0 and "succeeded" in shown.stdout and "2/2" in shown.stdout
    metrics = medtune("jobs", "metrics", job["id"], "--json", url=url)
    assert [r["step"] for r in json.loads(metrics.stdout)["data"]] == [1, 2]

    answer = medtune("infer", job["id"], "What is a fever?", "--max-new-tokens", "16", url=url)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip()
    assert "(adapter)" in answer.stderr
    base = medtune(
        "infer", job["id"], "What is a fever?", "--base", "--max-new-tokens", "8", "--json",
        url=url,
    )  # fmt: skip
    assert base.returncode == 0, base.stderr
    reply = json.loads(base.stdout)
    assert reply["adapter"] is False and reply["usage"]["completion_tokens"] <= 8

    listed = medtune("jobs", "list", "--json", "--all", "--limit", "1", url=url)
    assert listed.returncode == 0, listed.stderr
    page = json.loads(listed.stdout)
    ids = [j["id"] for j in page["data"]]
    assert job["id"] in ids and len(ids) == len(set(ids)) and not page["has_more"]
    succeeded = medtune("jobs", "list", "--status", "succeeded", url=url)
    assert job["id"] in succeeded.stdout and "STATUS" in succeeded.stdout.splitlines()[0]


@pytest.mark.slow
def test_watch_exits_1_when_the_job_does_not_succeed(
    pg_redis_stack: Stack, spec_file: Path
) -> None:
    url = pg_redis_stack.url
    spec = json.loads(spec_file.read_text())
    spec["training_config"]["max_steps"] = 400
    created = medtune("jobs", "create", "-f", "-", "--json", url=url, stdin=json.dumps(spec))
    assert created.returncode == 0, created.stderr
    job_id = json.loads(created.stdout)["id"]
    cancelled = medtune("jobs", "cancel", job_id, url=url)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith(f"job {job_id} ")
    watched = medtune("jobs", "watch", job_id, url=url, timeout=600)
    assert watched.returncode == 1, watched.stdout + watched.stderr
    assert f"job {job_id} cancelled" in watched.stdout
    again = medtune("jobs", "cancel", job_id, url=url)
    assert again.returncode == 2 and again.stderr.startswith("error job_not_cancellable: ")
