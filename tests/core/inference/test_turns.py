"""One slow request cannot hold the others: a long transformers generation yields its turn to a
request that arrives meanwhile and resumes from its KV cache with the same answer; llama.cpp has
a lane of its own; a request nobody waits for stops within a token."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from core.embedded_model import gguf_path
from core.inference.engine import InferenceCancelled, InferenceEngine, InferenceRequest
from core.inference.llamacpp import llama_cpp_available

BASE = "smollm2-135m-instruct"
LONG = [{"role": "user", "content": "Write a very long essay about the history of medicine."}]
SHORT = [{"role": "user", "content": "What is anemia?"}]


@pytest.fixture(scope="module")
def engine(model_cache: Path) -> InferenceEngine:
    return InferenceEngine(models_dir=model_cache, batch_wait_s=0.0)


def started(request: InferenceRequest, deltas: int = 1) -> threading.Event:
    """An event set once ``request`` has streamed ``deltas`` pieces."""
    seen: list[str] = []
    event = threading.Event()

    def on_delta(text: str) -> None:
        seen.append(text)
        if len(seen) >= deltas:
            event.set()

    request.on_delta = on_delta
    return event


def order_of(futures: dict[str, Future[Any]]) -> list[str]:
    finished: list[str] = []
    lock = threading.Lock()
    for name, future in futures.items():

        def note(_: Future[Any], name: str = name) -> None:
            with lock:
                finished.append(name)

        future.add_done_callback(note)
    for future in futures.values():
        future.exception()  # wait
    return finished


def test_a_short_request_does_not_wait_for_a_long_generation(engine: InferenceEngine) -> None:
    common: dict[str, Any] = {"base_model": BASE, "backend": "transformers"}
    alone = engine.answer(**common, messages=LONG, max_new_tokens=64)
    assert alone["finish_reason"] == "length"  # it really is long
    long = InferenceRequest(**common, messages=LONG, max_new_tokens=64)
    going = started(long)
    futures = {"long": engine.submit(long)}
    assert going.wait(300)
    futures["short"] = engine.submit(InferenceRequest(**common, messages=SHORT, max_new_tokens=2))
    assert order_of(futures) == ["short", "long"]
    # The long answer went on from its KV cache after its pause: greedy, the same text.
    assert futures["long"].result()["answer"] == alone["answer"]
    assert futures["long"].result()["usage"]["completion_tokens"] == 64


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python missing")
def test_llama_cpp_has_a_lane_of_its_own(engine: InferenceEngine) -> None:
    long = InferenceRequest(
        base_model=BASE, backend="transformers", messages=LONG, max_new_tokens=4096
    )
    going = started(long)
    stop = threading.Event()
    long.should_stop = stop.is_set
    futures = {"long": engine.submit(long)}
    assert going.wait(300)
    fast = InferenceRequest(
        base_model=BASE, backend="llama_cpp", gguf_path=str(gguf_path()), messages=SHORT
    )
    fast.max_new_tokens = 4
    futures["llama"] = engine.submit(fast)
    futures["llama"].add_done_callback(lambda _: stop.set())  # then stop the long one
    assert order_of(futures) == ["llama", "long"]
    assert futures["llama"].result()["backend"] == "llama_cpp"
    with pytest.raises(InferenceCancelled):
        futures["long"].result()


@pytest.mark.parametrize("backend", ["transformers", "llama_cpp"])
def test_a_request_nobody_waits_for_stops_within_a_token(
    engine: InferenceEngine, backend: str
) -> None:
    if backend == "llama_cpp" and not llama_cpp_available():
        pytest.skip("llama-cpp-python missing")
    request = InferenceRequest(
        base_model=BASE,
        backend=backend,
        gguf_path=str(gguf_path()),
        messages=LONG,
        max_new_tokens=4096,
    )
    pieces: list[str] = []
    request.on_delta = pieces.append
    request.should_stop = lambda: len(pieces) >= 3  # the API gave up after three pieces
    with pytest.raises(InferenceCancelled) as info:
        engine.submit(request).result()
    assert len(pieces) == 3
    assert "stopped after" in info.value.detail
    # A request given up on before the model took it never starts.
    late = InferenceRequest(
        base_model=BASE, backend=backend, gguf_path=str(gguf_path()), messages=SHORT
    )
    late.should_stop = lambda: True
    late.on_start = lambda: pieces.append("started")
    with pytest.raises(InferenceCancelled, match="before it started"):
        engine.submit(late).result()
    assert "started" not in pieces
