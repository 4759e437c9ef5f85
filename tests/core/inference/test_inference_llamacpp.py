"""The llama.cpp backend on the shipped SmolLM2 GGUF (the same weights as the embedded base)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.embedded_model import gguf_path
from core.errors import MedtuneError
from core.inference.adapters import job_gguf
from core.inference.engine import InferenceEngine
from core.inference.llamacpp import llama_cpp_available

pytestmark = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python missing")
BASE = "smollm2-135m-instruct"
MESSAGES = [
    {"role": "system", "content": "You are a helpful medical assistant."},
    {"role": "user", "content": "What are the symptoms of anemia?"},
]


@pytest.fixture(scope="module")
def engine(model_cache: Path) -> InferenceEngine:
    return InferenceEngine(models_dir=model_cache)


def test_gguf_answers_and_streams(engine: InferenceEngine) -> None:
    deltas: list[str] = []
    first = engine.answer(
        base_model=BASE,
        messages=MESSAGES,
        gguf_path=str(gguf_path()),
        max_new_tokens=24,
        on_delta=deltas.append,
    )
    assert first["backend"] == "llama_cpp"  # auto picks llama.cpp on a CPU when a GGUF exists
    assert first["answer"] and "".join(deltas) == first["answer"]
    assert first["usage"]["completion_tokens"] == 24 and first["finish_reason"] == "length"
    assert "<|im_end|>" not in first["answer"] and "<|im_start|>" not in first["answer"]
    second = engine.answer(
        base_model=BASE, messages=MESSAGES, gguf_path=str(gguf_path()), max_new_tokens=24
    )
    assert second["answer"] == first["answer"]  # greedy
    assert engine.loads["gguf"] == 1  # the second request reloads nothing


def test_gguf_and_transformers_render_the_same_prompt(engine: InferenceEngine) -> None:
    """Same chat template and tokens: the Q4_1 file's greedy answer starts like float32's."""
    common = {"base_model": BASE, "messages": MESSAGES, "max_new_tokens": 8}
    fast = engine.answer(**common, gguf_path=str(gguf_path()))
    slow = engine.answer(**common, backend="transformers")
    assert fast["usage"]["prompt_tokens"] == slow["usage"]["prompt_tokens"]
    assert fast["answer"].split()[:3] == slow["answer"].split()[:3]


def test_gguf_and_transformers_penalise_only_the_answer(engine: InferenceEngine) -> None:
    """Under /infer's penalty both backends give the short answer and stop: llama.cpp's sampler
    sees only the tokens it sampled, and transformers' penalty now skips the prompt too."""
    sky = [{"role": "user", "content": "What color is the sky? One word."}]
    common = {"base_model": BASE, "messages": sky, "max_new_tokens": 16}
    plain = engine.answer(**common, backend="transformers")
    assert plain["finish_reason"] == "stop"
    for penalty in (1.1, 1.3):
        fast = engine.answer(**common, gguf_path=str(gguf_path()), repetition_penalty=penalty)
        slow = engine.answer(**common, backend="transformers", repetition_penalty=penalty)
        assert fast["backend"] == "llama_cpp" and slow["backend"] == "transformers"
        assert fast["answer"] == slow["answer"] == plain["answer"]
        assert fast["finish_reason"] == slow["finish_reason"] == "stop"


def test_stop_strings_on_gguf(engine: InferenceEngine) -> None:
    common = {"base_model": BASE, "messages": MESSAGES, "gguf_path": str(gguf_path())}
    full = engine.answer(**common, max_new_tokens=24)["answer"]
    stop = " " + full.split()[3]
    cut = engine.answer(**common, max_new_tokens=24, stop=(stop,))
    assert cut["finish_reason"] == "stop"
    assert cut["answer"] == full[: full.index(stop)].strip()


def test_asking_for_llama_cpp_without_a_gguf_is_refused(engine: InferenceEngine) -> None:
    with pytest.raises(MedtuneError) as info:
        engine.answer(base_model=BASE, messages=MESSAGES, backend="llama_cpp", max_new_tokens=2)
    assert info.value.code == "backend_unavailable" and info.value.field == "backend"


def test_a_jobs_q4_k_m_export_is_found(tmp_path: Path) -> None:
    assert job_gguf(str(tmp_path)) is None
    (tmp_path / "gguf").mkdir()
    target = tmp_path / "gguf" / "model-q4_k_m.gguf"
    os.symlink(gguf_path(), target)
    assert job_gguf(str(tmp_path)) == str(target)


def test_a_damaged_gguf_is_a_clear_error(engine: InferenceEngine, tmp_path: Path) -> None:
    bad = tmp_path / "model-q4_k_m.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(MedtuneError) as info:
        engine.answer(base_model=BASE, messages=MESSAGES, gguf_path=str(bad), max_new_tokens=2)
    assert info.value.code == "gguf_invalid"
