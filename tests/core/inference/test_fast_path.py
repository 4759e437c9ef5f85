"""The adapter's fast path (core/inference/fast.py) and the warm-up (core/inference/warm.py).

What runs on the CPU: the memory plan, the background build and its LRU (with a stand-in
builder), the static loop over a peft adapter, unmerged and merged in memory, answering token
for token like the engine's transformers path, the engine switching an adapter's requests to a
ready fast model, and the warm task loading a base and an adapter so the first question loads
nothing. The CUDA side (compile, graphs, bitsandbytes) is tests/gpu/test_inference_gpu.py.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from core.inference.engine import InferenceEngine
from core.inference.fast import Fast, FastPaths, inference_bytes, room
from core.inference.fast_multi import MultiFast, slot_bytes
from core.inference.generate import Generation, GenerationRequest
from core.inference.static_decode import StaticDecoder
from core.inference.warm import reserved_bytes, send_warm, warm, warm_kwargs, why_not
from core.memory import GIB, KNOWN_SHAPES
from core.queue import INFER_QUEUE, WARM_TASK, celery_config
from core.settings import Settings
from core.spec import JobSpec
from tests.core.inference.test_inference import BASE, QUESTIONS, ask, make_adapter

LLAMA3_8B = KNOWN_SHAPES["llama-3-8b"]


@pytest.fixture
def llama8b_dir(tmp_path: Path) -> Path:
    """A folder with only the 8B shape's config.json: what the memory plan reads."""
    s = LLAMA3_8B
    config = {
        "vocab_size": s.vocab_size,
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_hidden_layers,
        "num_attention_heads": s.num_attention_heads,
        "num_key_value_heads": s.num_key_value_heads,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


class _Decoder:
    tokenizer = None

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, request: GenerationRequest) -> Generation:
        self.calls += 1
        return Generation("ok", "length", 1, request.max_new_tokens, False, 0.01, 0.001)


def _paths(memory: tuple[int, int], **kwargs: Any) -> FastPaths:
    built: list[str] = []

    def builder(kind: str) -> Any:
        def build(base: str, adapter: str, tokenizer: Any, *, cache_tokens: int) -> Fast:
            built.append(f"{kind}:{Path(adapter).name}")
            return Fast(_Decoder(), kind)

        return build

    paths = FastPaths(
        run_on_lane=lambda fn: fn(),  # the lane runs it at once
        loads=Counter(),
        enabled=True,
        builders={"merged_bf16": builder("merged_bf16"), "lora_4bit": builder("lora_4bit")},
        memory=lambda: memory,
        **kwargs,
    )
    paths.built = built  # type: ignore[attr-defined]
    return paths


def test_the_plan_takes_bf16_on_an_h200_and_4bit_within_a_t4(llama8b_dir: Path) -> None:
    h200 = (130 * GIB, 140 * GIB)
    assert _paths(h200).plan(str(llama8b_dir))[0] == "merged_bf16"
    # A T4 (15 GiB) already holding Unsloth's 4-bit base (about 5.8 GiB): a second 4-bit copy
    # fits, a bf16 one (16 GB of weights) never does.
    t4 = (int(9.2 * GIB), 15 * GIB)
    kind, why = _paths(t4).plan(str(llama8b_dir))
    assert kind == "lora_4bit", why
    # The same T4 while a recipe job (6.8 GiB) trains on it: nothing, and the reason says so.
    busy = _paths(t4)
    busy.reserve("j1", int(6.8 * GIB))
    kind, why = busy.plan(str(llama8b_dir))
    assert kind is None and "kept for training" in why and "merged_bf16" in why


def test_estimates_are_the_sizes_of_an_8b() -> None:
    bf16 = inference_bytes(LLAMA3_8B, four_bit=False, cache_tokens=4096) / GIB
    nf4 = inference_bytes(LLAMA3_8B, four_bit=True, cache_tokens=4096) / GIB
    assert 15.5 < bf16 < 17.5  # 8.03 B parameters in bf16 + cache; measured peak 15.62 GiB
    assert 5.5 < nf4 < 7.5  # measured peak of for_inference: 5.77 GiB
    assert room(GIB, free=3 * GIB, total=15 * GIB) is None
    assert "free" in (room(3 * GIB, free=3 * GIB, total=15 * GIB) or "")


def test_a_build_runs_once_and_the_lru_keeps_one(llama8b_dir: Path) -> None:
    paths = _paths((130 * GIB, 140 * GIB))
    assert paths.want(str(llama8b_dir), "/jobs/a/adapter", None)
    fast = paths.get("/jobs/a/adapter")
    assert fast is not None and fast.kind == "merged_bf16"
    assert fast.decoder.calls == 1  # install recorded the graphs with one short answer
    assert not paths.want(str(llama8b_dir), "/jobs/a/adapter", None)  # ready: nothing to do
    assert paths.want(str(llama8b_dir), "/jobs/b/adapter", None)
    assert paths.get("/jobs/a/adapter") is None and paths.get("/jobs/b/adapter") is not None
    assert paths.loads["fast"] == 2 and paths.loads["fast_evicted"] == 1
    assert paths.built == ["merged_bf16:adapter", "merged_bf16:adapter"]  # type: ignore[attr-defined]
    # Finished builds are not kept: the list holds the last one queued, not every Future.
    assert len(paths.builds) == 1


def test_no_room_and_failures_are_noted_not_retried(llama8b_dir: Path) -> None:
    paths = _paths((2 * GIB, 15 * GIB))
    assert not paths.want(str(llama8b_dir), "/jobs/a/adapter", None)
    assert "no fast path" in paths.notes["/jobs/a/adapter"]
    assert not paths.want(str(llama8b_dir), "/jobs/a/adapter", None)
    broken = _paths((130 * GIB, 140 * GIB))

    def fail(*args: Any, **kwargs: Any) -> Fast:
        raise RuntimeError("no bitsandbytes")

    broken.builders = {"merged_bf16": fail}
    assert broken.want(str(llama8b_dir), "/jobs/c/adapter", None)
    assert broken.get("/jobs/c/adapter") is None
    assert "no bitsandbytes" in broken.notes["/jobs/c/adapter"]


# --- the static loop over an adapter, on the real SmolLM2 ---------------------------------------


@pytest.fixture(scope="module")
def adapter(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(model_dir, tmp_path_factory.mktemp("fast") / "job_fast", seed=3)


@pytest.fixture(scope="module")
def peft_model(model_dir: Path, adapter: Path) -> tuple[Any, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model = PeftModel.from_pretrained(base, str(adapter), adapter_name="job_fast").eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def reference(model_cache: Path, adapter: Path) -> tuple[InferenceEngine, list[dict[str, Any]]]:
    """The engine's transformers path with the adapter (generate(), eager): the reference."""
    engine = InferenceEngine(models_dir=model_cache, max_batch=1, fast=False)
    answers = [
        engine.answer(
            base_model=BASE,
            messages=ask(q),
            adapter_dir=str(adapter),
            adapter_name="job_fast",
            max_new_tokens=20,
            backend="transformers",
        )
        for q in QUESTIONS[:2]
    ]
    return engine, answers


def test_static_loop_over_an_unmerged_adapter_answers_like_generate(
    peft_model: tuple[Any, Any], reference: tuple[InferenceEngine, list[dict[str, Any]]]
) -> None:
    """The 4-bit path's shape on the CPU: a peft model, LoRA applied, not merged."""
    model, tokenizer = peft_model
    decoder = StaticDecoder(model, tokenizer, max_cache_tokens=256, compile=False)
    for question, expected in zip(QUESTIONS[:2], reference[1], strict=True):
        deltas: list[str] = []
        ours = decoder.generate(
            GenerationRequest(messages=ask(question), max_new_tokens=20, on_delta=deltas.append)
        )
        assert ours.text == expected["answer"]
        assert ours.completion_tokens == expected["usage"]["completion_tokens"]
        assert "".join(deltas) == ours.text


def test_merged_in_memory_answers_like_the_adapter_and_the_engine_switches_to_it(
    model_dir: Path,
    adapter: Path,
    reference: tuple[InferenceEngine, list[dict[str, Any]]],
) -> None:
    """The H200 path's shape: the adapter merged into a copy of the base; once the engine holds
    it, an adapter's request (backend auto) answers from it, token for token the same."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine, expected = reference
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()
    decoder = StaticDecoder(
        merged, AutoTokenizer.from_pretrained(model_dir), max_cache_tokens=256, compile=False
    )
    engine.fast._keep(str(adapter), Fast(decoder, "merged_bf16"))
    loads = dict(engine.loads)
    engine._cuda = True  # choose_backend and _run_static as on a GPU; the decoder is on the CPU
    try:
        for question, want in zip(QUESTIONS[:2], expected, strict=True):
            got = engine.answer(
                base_model=BASE,
                messages=ask(question),
                adapter_dir=str(adapter),
                adapter_name="job_fast",
                max_new_tokens=20,
            )
            assert got["backend"] == "cuda_static" and got["fast_path"] == "merged_bf16"
            assert got["answer"] == want["answer"]
            assert got["usage"] == want["usage"]
    finally:
        engine._cuda = False
    assert dict(engine.loads) == loads  # nothing loaded to answer


# --- warming ------------------------------------------------------------------------------------


def test_warm_loads_base_and_adapter_so_the_first_question_loads_nothing(
    model_cache: Path, adapter: Path
) -> None:
    engine = InferenceEngine(models_dir=model_cache, max_batch=1, fast=False)
    done = warm(engine, base_model=BASE, adapter_dir=str(adapter), adapter_name="job_fast")
    assert done["warmed"] and done["loads"] == {"base": 1, "adapter": 1}
    assert engine.has_base(BASE, load_in_4bit=True)
    loads = dict(engine.loads)
    first = engine.answer(
        base_model=BASE,
        messages=ask(QUESTIONS[0]),
        adapter_dir=str(adapter),
        adapter_name="job_fast",
        max_new_tokens=4,
        backend="transformers",
    )
    assert first["answer"] and dict(engine.loads) == loads


def test_the_warm_message_reserves_the_training_job_on_its_own_card() -> None:
    spec = JobSpec.model_validate({"model_config": {"base_model": BASE}})
    training = warm_kwargs(spec, job_id="j1", training_gib=6.8)
    assert training["adapter_dir"] is None and training["training"]["gib"] == 6.8
    finished = warm_kwargs(spec, job_id="j1", adapter_dir="/jobs/j1/adapter")
    assert finished["adapter_name"] == "j1" and finished["training"] is None
    gib = {"gib": 6.8, "device": "GPU-a"}
    assert reserved_bytes(gib, my_device="GPU-a") == int(6.8 * GIB)
    assert reserved_bytes(gib, my_device="GPU-b") == 0  # another card
    assert reserved_bytes({"gib": 6.8, "device": None}, my_device="GPU-a") == int(6.8 * GIB)
    assert reserved_bytes(None, my_device="GPU-a") == 0


def test_warm_is_refused_where_training_and_inference_do_not_fit(llama8b_dir: Path) -> None:
    t4 = (int(8.0 * GIB), 15 * GIB)  # a T4 with a recipe job's model loaded
    why = why_not(str(llama8b_dir), load_in_4bit=True, reserved=int(6.8 * GIB), memory=t4)
    assert why is not None and "kept for training" in why
    assert why_not(str(llama8b_dir), load_in_4bit=True, reserved=0, memory=t4) is None


def test_send_warm_goes_to_the_inference_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    import core.inference.warm as warm_module

    sent: list[dict[str, Any]] = []

    class Queue:
        def send_task(self, name: str, **kwargs: Any) -> None:
            sent.append({"name": name, **kwargs})

    monkeypatch.setattr(warm_module, "_sender", lambda settings: Queue())
    spec = JobSpec.model_validate({"model_config": {"base_model": BASE}})
    send_warm(Settings(infer_warm=False), spec, job_id="j1")
    assert sent == []
    send_warm(Settings(), spec, job_id="j1", adapter_dir="/jobs/j1/adapter")
    assert sent[0]["name"] == WARM_TASK and sent[0]["queue"] == INFER_QUEUE
    assert sent[0]["kwargs"]["adapter_name"] == "j1"
    assert celery_config(Settings())["task_routes"][WARM_TASK] == {"queue": INFER_QUEUE}

    def broken(settings: Any) -> Any:
        raise ConnectionError("broker down")

    monkeypatch.setattr(warm_module, "_sender", broken)
    send_warm(Settings(), spec, job_id="j1")  # logged, never raised into the job


def test_fast_builds_do_not_start_on_the_cpu(model_cache: Path, adapter: Path) -> None:
    engine = InferenceEngine(models_dir=model_cache, max_batch=1)  # fast paths enabled
    done = engine.warm(BASE, adapter_dir=str(adapter), adapter_name="job_fast").result()
    assert done["fast_build_started"] is False and engine.fast.builds == []


def test_the_worker_task_warms_its_engine_and_never_raises(
    model_cache: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import tasks

    engine = InferenceEngine(models_dir=model_cache, max_batch=1, fast=False)
    monkeypatch.setattr(tasks, "_engine", lambda: engine)
    done = tasks.warm_task(BASE, adapter_dir=str(adapter), adapter_name="job_fast")
    assert done["warmed"] and engine.loads["base"] == 1 and engine.loads["adapter"] == 1
    gone = tasks.warm_task(BASE, adapter_dir=str(adapter.parent / "deleted"), adapter_name="x")
    assert gone["warmed"] is False and "AdapterMissing" in gone["why"]


# --- a new job's first answer comes before any fast build (issue #14 (b)) -----------------------


class _MultiDecoder:
    rows = 4
    tokenizer = None

    def __init__(self) -> None:
        self.slots = SimpleNamespace(check=lambda adapter_dir: None)

    def generate(self, requests: list[GenerationRequest], adapters: list[Any]) -> list[Generation]:
        return [
            Generation("ok", "length", 1, r.max_new_tokens, False, 0.01, 0.001) for r in requests
        ]


def test_fast_builds_start_only_after_the_adapters_first_answer(
    model_cache: Path, model_dir: Path, adapter: Path, tmp_path: Path
) -> None:
    """Warming an adapter builds nothing; its first answer (streamed) comes out, and only then
    does its fast model build, once the model thread is idle. The second adapter asked of the
    base then starts the base's multi-LoRA model instead of a model of its own."""
    other = make_adapter(model_dir, tmp_path / "job_other", seed=5)
    events: list[str] = []

    lane_tokenizers: list[Any] = []

    def build(base: str, adapter_dir: str, tokenizer: Any, *, cache_tokens: int) -> Fast:
        events.append(f"build:{Path(adapter_dir).name}")
        lane_tokenizers.append(tokenizer)
        return Fast(_Decoder(), "merged_bf16")

    def build_multi(base: str, tokenizer: Any, *, four_bit: bool, rows: int) -> MultiFast:
        events.append("multi")
        lane_tokenizers.append(tokenizer)
        return MultiFast(_MultiDecoder(), "multi_bf16")

    engine = InferenceEngine(models_dir=model_cache, max_batch=1)  # fast paths enabled
    engine.fast.builders = {"merged_bf16": build}
    engine.fast.multi_builder = build_multi
    engine.fast.memory = lambda: (130 * GIB, 140 * GIB)
    engine.warm(BASE, load_in_4bit=False).result()  # the base as the CPU loads it
    engine._cuda = True  # fast builds as on a GPU; the models stay on the CPU
    try:
        done = engine.warm(
            BASE, load_in_4bit=False, adapter_dir=str(adapter), adapter_name="job_fast"
        ).result()
        assert done["fast_build_started"] is False and engine.fast.builds == []
        for folder in (adapter, other):
            first = engine.answer(
                base_model=BASE,
                messages=ask(QUESTIONS[0]),
                adapter_dir=str(folder),
                adapter_name=folder.name,
                max_new_tokens=4,
                load_in_4bit=False,
                on_delta=lambda delta, name=folder.name: events.append(f"delta:{name}"),
            )
            assert first["backend"] == "transformers"
            for future in engine.fast.builds:
                future.result()
    finally:
        engine._cuda = False
    assert events[0] == "delta:job_fast" and events.count("build:job_fast") == 1
    firsts = [e for e in events if not e.startswith("delta")]
    # The second adapter is served by the base's multi-LoRA model: no model of its own.
    assert firsts == ["build:job_fast", "multi"]
    # Each build came after every delta of the answer that asked for it.
    assert events.index("build:job_fast") > max(
        i for i, e in enumerate(events) if e == "delta:job_fast"
    )
    assert events.index("multi") > max(i for i, e in enumerate(events) if e == "delta:job_other")
    # The lane encodes with its own copy of the base's tokenizer (one per base), never the one
    # the model thread pads per batch: a Rust tokenizer is not for two threads at once.
    [base] = engine._bases.values()
    assert len(lane_tokenizers) == 2 and lane_tokenizers[0] is lane_tokenizers[1]
    assert lane_tokenizers[0] is not base.tokenizer
    assert lane_tokenizers[0].get_vocab() == base.tokenizer.get_vocab()


def test_a_build_waits_while_the_model_thread_answers(llama8b_dir: Path) -> None:
    answering = iter([False, False, False])  # three looks at a busy model thread, then idle
    looks: list[bool] = []

    def idle() -> bool:
        looks.append(next(answering, True))
        return looks[-1]

    paths = _paths((130 * GIB, 140 * GIB), idle=idle)
    paths.builders["merged_bf16"] = lambda *a, **k: (looks.append(False), Fast(_Decoder(), "x"))[1]
    assert paths.want(str(llama8b_dir), "/jobs/a/adapter", None)
    # Four looks (the last one idle), then the build (its False marks when it ran).
    assert looks == [False, False, False, True, False]


def test_the_multi_lora_plan_takes_bf16_on_an_h200_and_nothing_beside_a_t4s_base(
    llama8b_dir: Path,
) -> None:
    kind, why = _paths((130 * GIB, 140 * GIB)).plan_multi(str(llama8b_dir))
    assert kind == "multi_bf16", why
    # 16 slots of rank 16 on an 8B's projections: 1.3 GiB of bf16 stacks.
    assert 1.2 < slot_bytes(LLAMA3_8B, slots=16, rank=16) / GIB < 1.4
    # A T4 already holding Unsloth's 4-bit base: no room for 8 rows' caches beside a 2nd base.
    kind, why = _paths((int(9.2 * GIB), 15 * GIB)).plan_multi(str(llama8b_dir))
    assert kind is None and "multi_4bit needs" in why
