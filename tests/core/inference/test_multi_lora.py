"""Batched multi-LoRA decoding (core/inference/multi_lora.py, batch_decode.py), eager on the CPU.

Rows of one batch through different adapters (different ranks and target modules, padded into
one stack), the base, and different prompts (left-padded) must answer token for token as each
adapter does alone through the engine's transformers path (peft, ``generate``). So must a slot
rewritten after its adapter was evicted. The CUDA-graph side is tests/gpu/test_inference_gpu.py.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from core.inference.batch_decode import BatchDecoder
from core.inference.engine import InferenceEngine
from core.inference.generate import GenerationRequest
from core.inference.multi_lora import LoraSlots, inject
from tests.core.inference.test_inference import BASE, ask

QUESTIONS = [
    "What is anemia?",
    "How is the flu treated, and when should a patient with the flu see a doctor?",
    "What causes a fever?",
    "Why?",
]
TOKENS = 8


def make_loras(model_dir: Path, out: Path, shapes: list[tuple[int, list[str]]]) -> list[Path]:
    """Random LoRA adapters (non-zero B: they change the answers), one per (rank, targets)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    folders = []
    for i, (r, targets) in enumerate(shapes):
        torch.manual_seed(20 + i)
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        peft = get_peft_model(model, config)
        folders.append(out / f"job_{i}")
        peft.save_pretrained(folders[-1])
        model = peft.unload()  # the bare base again
    return folders


@pytest.fixture(scope="module")
def loras(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    shapes = [
        (4, ["q_proj", "v_proj"]),
        (8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
        (2, ["gate_proj", "up_proj", "down_proj"]),
        (8, ["o_proj", "down_proj"]),
    ]
    return make_loras(model_dir, tmp_path_factory.mktemp("multi"), shapes)


@pytest.fixture(scope="module")
def alone(model_cache: Path, loras: list[Path]) -> Any:
    """The engine's transformers path, one request at a time: the reference answers."""
    engine = InferenceEngine(models_dir=model_cache, max_batch=1, fast=False)
    found: dict[tuple[Path | None, str, float, int], dict[str, Any]] = {}

    def answer(
        adapter: Path | None, question: str, penalty: float = 1.0, tokens: int = TOKENS
    ) -> dict[str, Any]:
        if (adapter, question, penalty, tokens) not in found:
            found[(adapter, question, penalty, tokens)] = engine.answer(
                base_model=BASE,
                messages=ask(question),
                adapter_dir=str(adapter) if adapter else None,
                adapter_name=adapter.name if adapter else None,
                max_new_tokens=tokens,
                repetition_penalty=penalty,
                backend="transformers",
            )
        return found[(adapter, question, penalty, tokens)]

    return answer


@pytest.fixture(scope="module")
def decoder(model_dir: Path) -> BatchDecoder:
    """SmolLM2 with 3 LoRA slots of rank 8 on every projection, 4 rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    layers, index = inject(model, slots=3, rank=8, rows=4)
    slots = LoraSlots(layers, index, loads=Counter())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return BatchDecoder(model, tokenizer, slots, rows=4, max_cache_tokens=96, compile=False)


def _batch(
    decoder: BatchDecoder,
    rows: list[tuple[Path | None, str]],
    penalty: float = 1.0,
    tokens: int = TOKENS,
) -> list[Any]:
    requests = [
        GenerationRequest(messages=ask(q), max_new_tokens=tokens, repetition_penalty=penalty)
        for _, q in rows
    ]
    return decoder.generate(requests, [str(a) if a else None for a, _ in rows])


def _same(got: list[Any], rows: list[tuple[Path | None, str]], alone: Any, **ask: Any) -> None:
    for gen, (adapter, question) in zip(got, rows, strict=True):
        want = alone(adapter, question, **ask)
        assert gen.text == want["answer"], (adapter, question)
        assert gen.completion_tokens == want["usage"]["completion_tokens"]
        assert gen.prompt_tokens == want["usage"]["prompt_tokens"]


def test_a_mixed_batch_answers_as_each_adapter_alone(
    decoder: BatchDecoder, loras: list[Path], alone: Any
) -> None:
    rows = [(loras[0], QUESTIONS[0]), (loras[1], QUESTIONS[1]), (None, QUESTIONS[2])]
    rows.append((loras[2], QUESTIONS[3]))
    got = _batch(decoder, rows)
    _same(got, rows, alone)
    # The adapters do change the answers, so the comparison above could fail.
    assert alone(loras[0], QUESTIONS[0])["answer"] != alone(None, QUESTIONS[0])["answer"]
    assert alone(loras[1], QUESTIONS[1])["answer"] != alone(None, QUESTIONS[1])["answer"]
    assert decoder.slots.loads["slot"] == 3 and decoder.slots.loads["slot_evicted"] == 0


def test_a_penalised_batch_answers_as_each_alone(
    decoder: BatchDecoder, loras: list[Path], alone: Any
) -> None:
    """The on-device penalty counts each row's answer tokens, as the transformers path does
    (generate.answer_penalty): not its prompt, nor its padding."""
    rows = [(loras[0], QUESTIONS[0]), (None, QUESTIONS[1]), (loras[1], QUESTIONS[2])]
    ask = {"penalty": 1.3, "tokens": 32}  # long enough to repeat itself
    _same(_batch(decoder, rows, **ask), rows, alone, **ask)
    assert any(alone(a, q, **ask)["answer"] != alone(a, q, tokens=32)["answer"] for a, q in rows)


def test_one_question_to_two_adapters_and_the_base_in_one_batch(
    decoder: BatchDecoder, loras: list[Path], alone: Any
) -> None:
    rows = [(loras[1], QUESTIONS[0]), (None, QUESTIONS[0]), (loras[0], QUESTIONS[0])]
    _same(_batch(decoder, rows), rows, alone)
    answers = {alone(a, q)["answer"] for a, q in rows}
    assert len(answers) == 3


def test_a_slot_rewritten_after_eviction_is_still_exact(
    decoder: BatchDecoder, loras: list[Path], alone: Any
) -> None:
    slots = decoder.slots
    _batch(decoder, [(loras[0], QUESTIONS[0]), (loras[1], QUESTIONS[0]), (loras[2], QUESTIONS[0])])
    evicted = slots.loads["slot_evicted"]
    # Three slots are full: the fourth adapter takes the least recently used one not in the batch.
    rows = [(loras[3], QUESTIONS[1]), (loras[0], QUESTIONS[0])]
    _same(_batch(decoder, rows), rows, alone)
    assert slots.loads["slot_evicted"] == evicted + 1
    assert str(loras[1]) not in slots.held() and str(loras[3]) in slots.held()
    # And the evicted one comes back into a rewritten slot, beside the one that replaced it.
    rows = [(loras[1], QUESTIONS[1]), (loras[3], QUESTIONS[1]), (None, QUESTIONS[1])]
    _same(_batch(decoder, rows), rows, alone)
    assert slots.loads["slot_evicted"] == evicted + 2 and len(slots.held()) == 3


def test_refused_adapters_say_why(
    decoder: BatchDecoder, model_dir: Path, tmp_path: Path, loras: list[Path]
) -> None:
    big, head = make_loras(model_dir, tmp_path, [(16, ["q_proj"]), (4, ["q_proj", "lm_head"])])
    assert "rank 16" in (decoder.slots.check(str(big)) or "")
    with pytest.raises(ValueError, match="rank 16"):
        decoder.slots.slot(str(big))
    assert "without slots" in (decoder.slots.check(str(head)) or "")
    assert decoder.slots.check(str(loras[2])) is None
    with pytest.raises(ValueError, match="1 to 4"):
        decoder.generate([], [])


def test_the_engine_answers_concurrent_questions_to_different_adapters_in_one_batch(
    model_cache: Path, decoder: BatchDecoder, loras: list[Path], alone: Any
) -> None:
    """With the base's multi-LoRA model ready (here the eager CPU decoder above), requests to
    three adapters that wait together on the fast lane are answered by one batch, each as its
    adapter alone; a question to the base stays on the model thread."""
    import threading

    from core.base_models import resolve
    from core.inference.engine import InferenceRequest, _Call
    from core.inference.fast_multi import MultiFast

    engine = InferenceEngine(models_dir=model_cache, max_batch=4, fast=False)
    engine.warm(BASE, load_in_4bit=False).result()  # the base as the CPU loads it
    engine.fast._multi[resolve(BASE, models_dir=model_cache)] = MultiFast(decoder, "multi_bf16")
    rows = [(loras[2], QUESTIONS[3]), (loras[3], QUESTIONS[1]), (loras[0], QUESTIONS[0])]
    rows.append((None, QUESTIONS[2]))
    release = threading.Event()
    engine._cuda = True  # choose the fast lane as on a GPU; the decoder is on the CPU
    try:
        held = engine.fast_lane.submit(_Call(release.wait))  # the lane is busy meanwhile
        futures = [
            engine.submit(
                InferenceRequest(
                    base_model=BASE,
                    messages=ask(question),
                    adapter_dir=str(adapter) if adapter else None,
                    adapter_name=adapter.name if adapter else None,
                    max_new_tokens=TOKENS,
                    load_in_4bit=False,
                )
            )
            for adapter, question in rows
        ]
        release.set()
        held.result()
        got = [future.result() for future in futures]
    finally:
        engine._cuda = False
    for answer, (adapter, question) in zip(got, rows, strict=True):
        assert answer["answer"] == alone(adapter, question)["answer"]
        assert answer["usage"] == alone(adapter, question)["usage"]
    assert [a["fast_path"] for a in got[:3]] == ["multi_bf16"] * 3
    assert [a["batch_size"] for a in got[:3]] == [3, 3, 3]
    assert got[3]["backend"] == "transformers" and "fast_path" not in got[3]


def test_dynamo_traces_the_step_whole_and_a_new_adapter_needs_no_new_graph(
    model_dir: Path, tmp_path: Path
) -> None:
    """What the GPU compiles with fullgraph (mode reduce-overhead there, the eager backend
    here): a tiny random Llama with LoRA slots, per-row positions and the padding mask."""
    import torch
    from torch._dynamo.utils import counters
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    first, second = make_loras(tmp_path / "tiny", tmp_path, [(4, ["q_proj"]), (2, ["down_proj"])])
    model = LlamaForCausalLM.from_pretrained(tmp_path / "tiny").eval()
    layers, index = inject(model, slots=1, rank=4, rows=2)
    decoder = BatchDecoder(
        model, tokenizer, LoraSlots(layers, index), rows=2, max_cache_tokens=48, compile=False
    )
    q = GenerationRequest(messages=ask("Hi"), max_new_tokens=4, ignore_eos=True)
    eager = [g.text for g in decoder.generate([q, q], [str(first), None])]
    before = counters["stats"]["unique_graphs"]
    decoder._decode = torch.compile(decoder._step, backend="eager", fullgraph=True, dynamic=False)
    assert [g.text for g in decoder.generate([q, q], [str(first), None])] == eager
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == before + 1  # one graph for the step
    decoder.generate([q, q], [str(second), None])  # the one slot rewritten
    assert decoder.slots.loads["slot_evicted"] == 1
    assert counters["stats"]["unique_graphs"] == graphs
