"""A request longer than its backend's context is refused before it runs, naming what is too
long; llama.cpp's context is the one the GGUF trained with."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from core.embedded_model import gguf_path
from core.inference.context import ContextLengthExceeded, check_fits, config_context
from core.inference.engine import InferenceEngine
from core.inference.llamacpp import llama_cpp_available

BASE = "smollm2-135m-instruct"
SMOLLM2_CONTEXT = 8192  # max_position_embeddings of the embedded model and its GGUF


def long_question(tokens: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": " a" * tokens}]  # " a" is one token


@pytest.fixture(scope="module")
def engine(model_cache: Path) -> InferenceEngine:
    return InferenceEngine(models_dir=model_cache)


def test_check_fits_names_the_prompt_or_max_new_tokens() -> None:
    with pytest.raises(ContextLengthExceeded) as prompt:
        check_fits(prompt_tokens=9000, max_new_tokens=1, context=8192, what="the model's context")
    assert prompt.value.field == "messages" and "9000 tokens" in prompt.value.detail
    with pytest.raises(ContextLengthExceeded) as total:
        check_fits(prompt_tokens=8000, max_new_tokens=256, context=8192, what="the context")
    assert total.value.field == "max_new_tokens" and "at most 192" in total.value.detail
    assert total.value.status == 400
    check_fits(prompt_tokens=8000, max_new_tokens=192, context=8192, what="the context")


def test_config_context_reads_the_usual_keys() -> None:
    assert config_context({"max_position_embeddings": 8192}) == 8192
    assert config_context({"n_positions": 1024}) == 1024
    assert config_context({"text_config": {"max_position_embeddings": 4096}}) == 4096
    assert config_context({}) is None


@pytest.mark.parametrize("backend", ["transformers", "llama_cpp"])
def test_a_prompt_longer_than_the_context_is_refused_at_once(
    engine: InferenceEngine, backend: str
) -> None:
    if backend == "llama_cpp" and not llama_cpp_available():
        pytest.skip("llama-cpp-python missing")
    common = {"base_model": BASE, "backend": backend, "gguf_path": str(gguf_path())}
    started = time.monotonic()
    with pytest.raises(ContextLengthExceeded) as prompt:
        engine.answer(**common, messages=long_question(26_000), max_new_tokens=16)
    assert prompt.value.field == "messages"
    with pytest.raises(ContextLengthExceeded) as total:
        engine.answer(**common, messages=long_question(6000), max_new_tokens=4096)
    assert total.value.field == "max_new_tokens"
    assert f"of {SMOLLM2_CONTEXT} tokens" in total.value.detail
    # Refused before generation: a 26,000-token prefill alone takes minutes on this CPU.
    assert time.monotonic() - started < 60
    assert engine.batcher.batch_sizes == [] or backend == "llama_cpp"


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python missing")
def test_llama_cpp_gets_the_context_the_gguf_trained_with(engine: InferenceEngine) -> None:
    assert engine.llama.context_length(str(gguf_path())) == SMOLLM2_CONTEXT
    # max_new_tokens 4096 plus any prompt did not fit the fixed 4,096 context llama.cpp had.
    answer = engine.answer(
        base_model=BASE,
        backend="llama_cpp",
        gguf_path=str(gguf_path()),
        messages=[{"role": "user", "content": "Say hello."}],
        max_new_tokens=4096,
    )
    assert answer["backend"] == "llama_cpp" and answer["finish_reason"] == "stop"
