"""Inference through the live service: API + an inference-only Celery worker on real Redis and
Postgres and the real SmolLM2. Streams (/infer and /v1/chat/completions), adapter errors as
problems before a stream starts, and concurrent requests batched by the worker.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from cli.client import parse_sse
from core.inference.llamacpp import llama_cpp_available
from core.queue import INFER_QUEUE
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from tests.conftest import (
    Stack,
    claim_redis_db,
    free_port,
    stack_env,
    start_api,
    start_worker,
    wait_healthy,
)
from tests.core.inference.test_inference import make_adapter
from tests.helpers import recipe_spec

pytestmark = pytest.mark.slow
QUESTION = "What are the symptoms of anemia?"


@pytest.fixture(scope="module")
def infer_broker() -> Iterator[str]:
    broker = claim_redis_db()  # only this module's worker consumes this broker's infer queue
    yield broker
    redis.Redis.from_url(broker).flushdb()


@pytest.fixture(scope="module")
def infer_stack(
    tmp_path_factory: pytest.TempPathFactory, migrated_pg: str, model_cache: Path, infer_broker: str
) -> Iterator[Stack]:
    """API + one inference-only worker (threads pool) on their own Redis database."""
    broker = infer_broker
    home = tmp_path_factory.mktemp("infer-stack")
    env = stack_env(home, model_cache, database_url=migrated_pg, broker_url=broker)
    # A long batch window makes "concurrent requests share a batch" deterministic here.
    env.update(MEDTUNE_INFER_BATCH_WAIT_MS="300", MEDTUNE_INFER_BACKEND="transformers")
    port = free_port()
    stack = Stack(url=f"http://127.0.0.1:{port}", home=home)
    start_worker(stack, "infer", env, queues=INFER_QUEUE)
    start_api(stack, port, env)
    wait_healthy(stack)
    yield stack
    stack.stop()


def add_job(db_url: str, *, adapter: Path | None, name: str = "smol-live") -> str:
    """A succeeded job row pointing at ``adapter`` (stored directly: nothing is queued)."""
    spec = recipe_spec("sample:medical_qa")
    spec["model_config"]["finetuned_model"] = name
    with session_scope(db_url) as s:
        job = jobs.create_job(s, JobSpec.model_validate(spec))
        job.status = JobStatus.succeeded
        job.adapter_dir = str(adapter) if adapter else None
        job.artifacts_dir = str(adapter.parent) if adapter else None
        s.add(job)
        s.commit()
        return job.id


@pytest.fixture(scope="module")
def adapter(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(model_dir, tmp_path_factory.mktemp("live") / "adapter", seed=7)


@pytest.fixture(scope="module")
def job_id(migrated_pg: str, adapter: Path) -> str:
    return add_job(migrated_pg, adapter=adapter)


def client(stack: Stack) -> httpx.Client:
    return httpx.Client(base_url=stack.url, timeout=httpx.Timeout(30, read=300))


def infer_stream(http: httpx.Client, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    with http.stream("POST", "/infer", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return [(e.event, e.data) for e in parse_sse(response.iter_lines())]


def test_infer_streams_deltas_then_usage(infer_stack: Stack, job_id: str) -> None:
    body = {"job_id": job_id, "question": QUESTION, "max_new_tokens": 24}
    with client(infer_stack) as http:
        events = infer_stream(http, body)
        whole = http.post("/infer", json=body)
    assert whole.status_code == 200, whole.text
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"delta"} and len(kinds) > 3
    done = events[-1][1]
    assert "".join(data["text"] for _, data in events[:-1]) == done["answer"]
    assert done["finish_reason"] in ("stop", "length")
    assert done["usage"]["completion_tokens"] <= 24 and done["usage"]["prompt_tokens"] > 10
    assert done["adapter"] is True and done["model"] == "smol-live"
    # Greedy: the streamed answer is the one a plain request gets.
    assert whole.json()["answer"] == done["answer"]
    assert whole.json()["backend"] == "transformers"


def test_stop_strings_reach_the_worker(infer_stack: Stack, job_id: str) -> None:
    body = {"job_id": job_id, "question": QUESTION, "max_new_tokens": 24}
    with client(infer_stack) as http:
        full = http.post("/infer", json=body).json()["answer"]
        stop = " " + full.split()[2]
        cut = http.post("/infer", json={**body, "stop": [stop]}).json()
    assert cut["finish_reason"] == "stop"
    assert cut["answer"] == full[: full.index(stop)].strip()


@pytest.mark.parametrize("stream", [False, True])
def test_adapter_problems_come_before_any_stream(
    infer_stack: Stack, migrated_pg: str, adapter: Path, tmp_path: Path, stream: bool
) -> None:
    deleted = tmp_path / "deleted" / "adapter"
    shutil.copytree(adapter, deleted)
    broken = tmp_path / "broken" / "adapter"
    shutil.copytree(adapter, broken)
    (broken / "adapter_config.json").write_text("{not json")
    cases = {
        add_job(migrated_pg, adapter=deleted, name="smol-bad"): "adapter_missing",
        add_job(migrated_pg, adapter=broken, name="smol-bad"): "adapter_invalid",
        add_job(migrated_pg, adapter=None, name="smol-bad"): "no_adapter",
    }
    shutil.rmtree(deleted)
    with client(infer_stack) as http:
        for job, code in cases.items():
            response = http.post(
                "/infer", json={"job_id": job, "question": "Hi?", "stream": stream}
            )
            assert response.status_code == 409, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
            problem = response.json()
            assert problem["code"] == code and problem["field"] == "job_id"
            assert str(tmp_path) not in problem["detail"]  # no server path in the message


def test_concurrent_requests_share_a_batch_and_keep_their_answers(
    infer_stack: Stack, job_id: str
) -> None:
    questions = [QUESTION, "How is the flu treated?", "What causes a fever?", "Is rest good?"]
    bodies = [
        {"job_id": job_id, "question": q, "max_new_tokens": 12, "use_adapter": i % 2 == 0}
        for i, q in enumerate(questions)
    ]
    with client(infer_stack) as http:
        alone = [http.post("/infer", json=b).json() for b in bodies]
        with ThreadPoolExecutor(len(bodies)) as pool:
            together = list(pool.map(lambda b: http.post("/infer", json=b).json(), bodies))
    assert max(t["batch_size"] for t in together) > 1, together
    assert [t["answer"] for t in together] == [a["answer"] for a in alone]


def chat_chunks(http: httpx.Client, body: dict[str, Any]) -> list[Any]:
    chunks: list[Any] = []
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                payload = line[len("data: ") :]
                chunks.append(payload if payload == "[DONE]" else json.loads(payload))
    return chunks


def test_openai_chat_completion_and_its_stream(infer_stack: Stack, job_id: str) -> None:
    body = {
        "model": "smol-live",  # the finetuned_model name resolves to the job
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 16,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    with client(infer_stack) as http:
        chunks = chat_chunks(http, body)
        whole = http.post(
            "/v1/chat/completions", json={k: v for k, v in body.items() if k != "stream_options"}
        )
    assert whole.status_code == 200, whole.text
    completion = whole.json()
    assert completion["object"] == "chat.completion" and completion["model"] == "smol-live"
    assert completion["choices"][0]["message"]["role"] == "assistant"
    assert chunks[-1] == "[DONE]"
    objects = chunks[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in objects)
    assert len({c["id"] for c in objects}) == 1
    assert objects[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in objects if c["choices"])
    assert text == completion["choices"][0]["message"]["content"]
    finals = [c for c in objects if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1
    assert finals[0]["choices"][0]["finish_reason"] == completion["choices"][0]["finish_reason"]
    assert objects[-1]["choices"] == [] and objects[-1]["usage"] == completion["usage"]


def test_openai_chat_with_the_base_model(infer_stack: Stack) -> None:
    with client(infer_stack) as http:
        response = http.post(
            "/v1/chat/completions",
            json={
                "model": "smollm2-135m-instruct",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_completion_tokens": 8,
            },
        )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 8


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python missing")
def test_the_llama_cpp_backend_streams_through_the_api(infer_stack: Stack, job_id: str) -> None:
    body = {
        "job_id": job_id,
        "use_adapter": False,  # the embedded base: its shipped GGUF
        "question": QUESTION,
        "max_new_tokens": 16,
        "backend": "llama_cpp",
    }
    with client(infer_stack) as http:
        events = infer_stream(http, body)
        refused = http.post("/infer", json={**body, "use_adapter": True})
    done = events[-1][1]
    assert events[-1][0] == "done" and done["backend"] == "llama_cpp"
    assert "".join(data["text"] for _, data in events[:-1]) == done["answer"]
    assert done["usage"]["completion_tokens"] <= 16
    # The tuned job has no GGUF export: asking llama.cpp for it says how to get one.
    assert refused.status_code == 409 and refused.json()["code"] == "backend_unavailable"
    assert refused.json()["field"] == "backend"


def test_the_inference_only_worker_gives_llama_cpp_every_usable_cpu(
    infer_stack: Stack, job_id: str
) -> None:
    """The worker was started with -Q medtune.infer alone and no MEDTUNE_INFER_THREADS."""
    with client(infer_stack) as http:
        assert http.post("/infer", json={"job_id": job_id, "question": "Hi?"}).status_code == 200
    log = (infer_stack.home / "infer.log").read_text(errors="replace")
    cpus = len(os.sched_getaffinity(0))  # the worker inherits this process's affinity
    assert f"llama.cpp threads: {cpus} (by role; queues {INFER_QUEUE})" in log, log[-2000:]


LONG_ESSAY = [{"role": "user", "content": "Write a very long essay about the history of medicine."}]
# Without a penalty SmolLM2's greedy essay loops on to any limit (1,500 tokens, 67 s on one CPU
# thread); with /infer's default 1.1 it ends on its own after about 450 tokens.
RUNS_ON = {"messages": LONG_ESSAY, "max_new_tokens": 4096, "repetition_penalty": 1.0}


def test_a_prompt_longer_than_the_context_is_refused_before_it_runs(
    infer_stack: Stack, job_id: str
) -> None:
    turn = " a" * 10_000  # 10,000 tokens: the most characters a message may hold
    huge = [{"role": r, "content": turn} for r in ("user", "assistant", "user")]  # 30,000
    base = {"job_id": job_id, "use_adapter": False, "max_new_tokens": 16}
    with client(infer_stack) as http:
        for backend in ("transformers", "llama_cpp"):
            # SmolLM2's context is 8,192 tokens; such a prompt ran for minutes on transformers.
            response = http.post("/infer", json={**base, "backend": backend, "messages": huge})
            assert response.status_code == 400, response.text
            assert response.json()["code"] == "context_length_exceeded"
            assert response.json()["field"] == "messages", response.json()
            assert "8192" in response.json()["detail"]
        question = http.post("/infer", json={**base, "question": turn})
        assert question.json()["field"] == "question", question.json()
        room = http.post("/infer", json={**base, "question": " a" * 6000, "max_new_tokens": 4096})
        assert room.status_code == 400 and room.json()["field"] == "max_new_tokens", room.text
        assert "set max_new_tokens to at most" in room.json()["detail"]
        chat = http.post(
            "/v1/chat/completions",
            json={"model": "smollm2-135m-instruct", "messages": huge, "max_tokens": 8},
        )
        assert chat.status_code == 400 and chat.json()["field"] == "messages", chat.text


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python missing")
def test_llama_cpp_takes_the_largest_max_new_tokens(infer_stack: Stack, job_id: str) -> None:
    """Its context was 4,096 tokens, so max_new_tokens 4096 failed with any prompt."""
    body = {"job_id": job_id, "use_adapter": False, "backend": "llama_cpp", "max_new_tokens": 4096}
    with client(infer_stack) as http:
        response = http.post("/infer", json={**body, "question": "Say hello."})
    assert response.status_code == 200, response.text
    assert response.json()["backend"] == "llama_cpp"


def stopped_lines(stack: Stack) -> int:
    """Generations the worker stopped because nobody waited for them any more."""
    return (stack.home / "infer.log").read_text(errors="replace").count("nobody waits")


def wait_stopped(stack: Stack, before: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while stopped_lines(stack) <= before:
        assert time.monotonic() < deadline, stack.tail_logs()
        time.sleep(0.2)


@pytest.fixture(scope="module")
def impatient(
    infer_stack: Stack,
    infer_broker: str,
    migrated_pg: str,
    model_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """A second API on the same broker and worker that waits 20 s for an answer."""
    home = tmp_path_factory.mktemp("impatient")
    env = stack_env(
        home,
        model_cache,
        database_url=migrated_pg,
        broker_url=infer_broker,
        infer_timeout_s="20",
    )
    port = free_port()
    api = Stack(url=f"http://127.0.0.1:{port}", home=home)
    start_api(api, port, env)
    wait_healthy(api)
    yield api
    api.stop()


def test_a_timed_out_request_stops_and_the_next_one_is_answered(
    infer_stack: Stack, impatient: Stack, job_id: str
) -> None:
    body = {"job_id": job_id, "use_adapter": False, "backend": "transformers"}
    before = stopped_lines(infer_stack)
    with client(impatient) as http:
        long = http.post("/infer", json={**body, **RUNS_ON})
        assert long.status_code == 504 and long.json()["code"] == "inference_timeout"
        # It had started: the answer took too long (it is not that no worker is there).
        assert "the answer took longer than 20 s" in long.json()["detail"], long.json()
        wait_stopped(infer_stack, before)  # the worker stopped computing it
        short = http.post("/infer", json={**body, "question": "Hi?", "max_new_tokens": 4})
    assert short.status_code == 200, short.text


def test_no_worker_at_all_is_told_apart(
    tmp_path: Path, migrated_pg: str, model_cache: Path, job_id: str
) -> None:
    broker = claim_redis_db()  # a broker nobody consumes
    env = stack_env(
        tmp_path, model_cache, database_url=migrated_pg, broker_url=broker, infer_timeout_s="2"
    )
    port = free_port()
    api = Stack(url=f"http://127.0.0.1:{port}", home=tmp_path)
    start_api(api, port, env)
    try:
        wait_healthy(api)
        with client(api) as http:
            response = http.post("/infer", json={"job_id": job_id, "question": "Hi?"})
    finally:
        api.stop()
        redis.Redis.from_url(broker).flushdb()
    assert response.status_code == 504, response.text
    assert "no inference worker took the request in 2 s" in response.json()["detail"]


def test_short_requests_are_not_queued_behind_a_long_generation(
    infer_stack: Stack, job_id: str
) -> None:
    body = {"job_id": job_id, "use_adapter": False}
    long = {**body, **RUNS_ON, "backend": "transformers"}
    shorts = [{**body, "question": "Hi?", "max_new_tokens": 4, "backend": "transformers"}]
    if llama_cpp_available():
        shorts.append({**body, "question": "Hi?", "max_new_tokens": 4, "backend": "llama_cpp"})
    before = stopped_lines(infer_stack)
    long_events: list[str] = []
    with client(infer_stack) as http, ThreadPoolExecutor(len(shorts)) as pool:
        with http.stream("POST", "/infer", json={**long, "stream": True}) as response:
            assert response.status_code == 200, response.read()
            for event in parse_sse(response.iter_lines()):
                long_events.append(event.event)
                if len(long_events) == 1:  # the long one is generating: ask the short ones
                    answers = [pool.submit(http.post, "/infer", json=b) for b in shorts]
                if event.event != "delta" or all(a.done() for a in answers):
                    break  # leaving the stream cancels the long generation
        results = [a.result() for a in answers]
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert "done" not in long_events  # the short ones came back while it still ran
    wait_stopped(infer_stack, before)  # and the long one stopped when its client left
