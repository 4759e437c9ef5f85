"""GPU paths of the inference engine (skipped without CUDA; run on the GPU machine).

A small random Llama with its own byte-level BPE tokenizer and ChatML template is built in the
test (no hub, nothing to carry): weights do not matter for what is checked here, that the CUDA
code paths run and keep the engine's promises (adapters loaded once, batching, stops, the
static-cache compiled path, the fast paths the engine builds for an adapter: merged in memory,
or the 4-bit base with the LoRA unmerged, both through the CUDA-graph loop).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.gpu

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# No module-level skip: tests/gpu/conftest.py skips every gpu test without CUDA at collection,
# and ``pytest --collect-only -m gpu tests/gpu`` still lists them here.


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = [
        "patient",
        "symptom",
        "fever",
        "anemia",
        "treatment",
        "blood",
        "heart",
        "pain",
        "dose",
        "risk",
        "the",
        "of",
        "and",
        "is",
    ]
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(20)) for i in range(500)]
    special = ["<|im_start|>", "<|im_end|>", "<|pad|>"]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token=None
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        vocab_size=len(fast),
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("gpu-adapters")
    made = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
        config = LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
        get_peft_model(model, config).save_pretrained(root / f"job_{seed}")
        made.append(root / f"job_{seed}")
    return made


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


@pytest.fixture(autouse=True)
def models_allowed(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny model lives in a pytest folder: make it a model root, as an operator would."""
    monkeypatch.setenv("MEDTUNE_MODEL_ROOTS", json.dumps([str(tiny_model.parent)]))


def test_adapters_on_cuda_load_once_and_batch(
    tiny_model: Path, adapters: list[Path], tmp_path: Path
) -> None:
    from core.inference.engine import InferenceEngine, InferenceRequest

    engine = InferenceEngine(models_dir=tmp_path, max_batch=4, batch_wait_s=0.3)

    def request(adapter: Path | None, question: str) -> InferenceRequest:
        return InferenceRequest(
            base_model=str(tiny_model),
            messages=ask(question),
            adapter_dir=str(adapter) if adapter else None,
            adapter_name=adapter.name if adapter else None,
            load_in_4bit=False,
            max_new_tokens=12,
        )

    first = engine.submit(request(adapters[0], "fever?")).result()
    engine.submit(request(adapters[0], "anemia?")).result()
    assert engine.loads["base"] == 1 and engine.loads["adapter"] == 1
    assert first["backend"] == "transformers" and first["usage"]["completion_tokens"] <= 12
    # Two questions to one adapter batch together (with Unsloth, whose LoRA kernels serve one
    # adapter at a time, requests to other adapters wait for their own batch).
    futures = [
        engine.submit(request(a, q))
        for a, q in [(adapters[0], "pain?"), (adapters[0], "dose?"), (adapters[1], "risk?")]
    ]
    results = [f.result() for f in futures]
    assert engine.loads["adapter"] == 2
    assert results[0]["batch_size"] == results[1]["batch_size"] == 2
    assert all(0 < r["usage"]["completion_tokens"] <= 12 for r in results)


def test_unsloth_for_inference_is_used_when_installed(tiny_model: Path) -> None:
    pytest.importorskip("unsloth")
    from core.inference.cuda import load_base

    model, tokenizer = load_base(str(tiny_model), load_in_4bit=True, max_seq_length=1024)
    # for_inference switches the model out of training mode and marks it for Unsloth's kernels.
    assert not model.training
    assert tokenizer.eos_token == "<|im_end|>"


def _eager(tiny_model: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.bfloat16, device_map={"": 0}
    ).eval()


def test_static_cache_compiled_path_answers_like_eager(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from core.inference.engine import InferenceEngine
    from core.inference.generate import GenerationRequest, generate_one

    engine = InferenceEngine(models_dir=tmp_path)
    common = {"base_model": str(tiny_model), "messages": ask("fever?"), "max_new_tokens": 16}
    fast = engine.answer(**common, merged_dir=str(tiny_model))
    again = engine.answer(**common, merged_dir=str(tiny_model))
    assert fast["backend"] == again["backend"] == "cuda_static"
    assert engine.loads["merged"] == 1  # compiled once, reused
    # The tests above loaded Unsloth in this process, which swaps transformers' rotary class;
    # the static path must have put the stock one back to capture its step in one graph.
    compiled = engine.fast.get(str(tiny_model))
    assert compiled is not None and compiled.kind == "merged_export"
    rotary = compiled.decoder.model.model.rotary_emb
    assert type(rotary).__module__ == type(compiled.decoder.model).__module__
    eager = generate_one(
        _eager(tiny_model),
        AutoTokenizer.from_pretrained(tiny_model),
        GenerationRequest(messages=ask("fever?"), max_new_tokens=16),
    )
    assert fast["usage"]["prompt_tokens"] == eager.prompt_tokens
    assert fast["answer"] == again["answer"]
    # Same greedy tokens at the start (bf16 kernels may differ by rounding further on).
    assert fast["answer"][:8] == eager.text[:8]


# --- the adapter's fast paths (issue #14): built by the engine itself, switched to when ready --


def _eager_with_adapter(tiny_model: Path, adapter: Path, question: str) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.inference.generate import GenerationRequest, generate_one

    base = AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.bfloat16, device_map={"": 0}
    ).eval()
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    # Named: a request with no adapter answers with the base model (adapters disabled), which
    # is what this reference gave until session 8 (the fast paths were right, it was not).
    gen = generate_one(
        model,
        AutoTokenizer.from_pretrained(tiny_model),
        GenerationRequest(messages=ask(question), max_new_tokens=16, adapter="default"),
    )
    return gen.text


def test_engine_builds_the_fast_path_and_switches_to_it(
    tiny_model: Path, adapters: list[Path], tmp_path: Path
) -> None:
    from core.inference.engine import InferenceEngine

    engine = InferenceEngine(models_dir=tmp_path)
    adapter = adapters[0]
    done = engine.warm(
        str(tiny_model), load_in_4bit=False, adapter_dir=str(adapter), adapter_name="a0"
    ).result()
    # No build while the job's first answer may be coming: it starts after that answer.
    assert not done["fast_build_started"] and engine.fast.builds == []
    common: dict[str, Any] = {
        "base_model": str(tiny_model),
        "messages": ask("fever?"),
        "adapter_dir": str(adapter),
        "adapter_name": "a0",
        "max_new_tokens": 16,
        "load_in_4bit": False,
    }
    loads = dict(engine.loads)
    slow = engine.answer(**common)  # while the fast model builds, or after: never a load
    deadline = time.monotonic() + 300
    while engine.fast.get(str(adapter)) is None and time.monotonic() < deadline:
        assert str(adapter) not in engine.fast.notes, engine.fast.notes
        time.sleep(0.5)
    fast = engine.answer(**common)
    sampled = engine.answer(**{**common, "temperature": 0.8, "top_p": 0.9})
    assert fast["backend"] == "cuda_static" and fast["fast_path"] == "merged_bf16"
    assert sampled["backend"] == "cuda_static"
    assert {k: v for k, v in engine.loads.items() if k in ("base", "adapter")} == {
        k: v for k, v in loads.items() if k in ("base", "adapter")
    }
    assert engine.loads["fast"] == 1
    eager = _eager_with_adapter(tiny_model, adapter, "fever?")
    # Same greedy tokens at the start (bf16 kernels may differ by rounding further on).
    assert fast["answer"][:8] == eager[:8]
    assert slow["answer"]


def test_4bit_base_with_unmerged_lora_runs_the_graph_loop(
    tiny_model: Path, adapters: list[Path]
) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoTokenizer

    from core.inference.fast import build_lora_4bit
    from core.inference.generate import GenerationRequest, generate_one

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    fast = build_lora_4bit(str(tiny_model), str(adapters[0]), tokenizer, cache_tokens=512)
    request = GenerationRequest(messages=ask("fever?"), max_new_tokens=16)
    first = fast.generate(request)  # records the graphs (this thread's tree)
    again = fast.generate(request)  # replays them
    assert first.text == again.text and again.completion_tokens > 0
    assert fast.kind == "lora_4bit"
    # The same weights (4-bit base, LoRA layers active) through generate(), eagerly.
    eager = generate_one(fast.decoder.model, tokenizer, request)
    assert again.text[:8] == eager.text[:8]


def test_concurrent_questions_to_two_adapters_answer_as_one_at_a_time(
    tiny_model: Path, adapters: list[Path], tmp_path: Path
) -> None:
    """Whether they share a batch (peft's mixed adapters) or not (Unsloth's kernels), the
    answers are the ones each question gets alone, greedy."""
    from core.inference.engine import InferenceEngine, InferenceRequest

    engine = InferenceEngine(models_dir=tmp_path, max_batch=4, batch_wait_s=0.3, fast=False)

    def request(adapter: Path) -> InferenceRequest:
        return InferenceRequest(
            base_model=str(tiny_model),
            messages=ask("anemia?"),
            adapter_dir=str(adapter),
            adapter_name=adapter.name,
            load_in_4bit=False,
            max_new_tokens=12,
        )

    alone = [engine.submit(request(a)).result()["answer"] for a in adapters]
    together = [f.result()["answer"] for f in [engine.submit(request(a)) for a in adapters]]
    assert together == alone
    assert alone[0] != alone[1]  # the adapters do differ: a mix-up would show


# --- multi-LoRA: different adapters in one CUDA-graph batch (issue #14 (a)) ---------------------


@pytest.fixture(scope="module")
def unsloth_live(tiny_model: Path) -> bool:
    """As in the inference worker, whose model thread loads the base through Unsloth before the
    lane builds anything: Unsloth (where installed) has loaded a model in this process, so its
    process-wide patches (Llama classes' forwards, the rotary class, transformers' SDPA mask,
    dynamo's and inductor's settings) are live when the multi-LoRA model is built."""
    try:
        import unsloth  # noqa: F401
    except ImportError:
        return False
    from core.inference.cuda import load_base

    load_base(str(tiny_model), load_in_4bit=False, max_seq_length=1024)
    return True


def _same_length_questions(decoder: Any, count: int) -> list[str]:
    """``count`` different questions whose prompts have one token length: rows of a batch with
    no left padding, so each row's prefill and cache positions are what they are alone."""
    from core.inference.generate import GenerationRequest

    words = ["fever", "anemia", "pain", "dose", "risk", "heart", "blood", "treatment"]
    by_length: dict[int, list[str]] = {}
    for a in words:
        for b in words:
            if a != b:
                q = f"{a} {b}?"
                n = len(decoder._prompt(GenerationRequest(messages=ask(q), max_new_tokens=1)))
                by_length.setdefault(n, []).append(q)
    found = max(by_length.values(), key=len)
    assert len(found) >= count, by_length
    return found[:count]


def _third_adapter(tiny_model: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.mark.parametrize("four_bit", [False, True])
def test_multi_lora_graph_batch_answers_as_each_adapter_alone(
    tiny_model: Path, adapters: list[Path], tmp_path: Path, four_bit: bool, unsloth_live: bool
) -> None:
    """Rows of one replayed batch use different adapters (and the base) and answer as each
    alone through the same graphs; rewriting a slot (LRU) neither recompiles nor goes stale.
    With Unsloth loaded in the process first, as in the inference worker."""
    if four_bit:
        pytest.importorskip("bitsandbytes")
    from torch._dynamo.utils import counters
    from transformers import AutoTokenizer

    from core.inference.fast_multi import build_multi
    from core.inference.generate import GenerationRequest

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    multi = build_multi(
        str(tiny_model), tokenizer, four_bit=four_bit, rows=4, slots=2, cache_tokens=512
    )
    assert multi.kind == ("multi_4bit" if four_bit else "multi_bf16") and multi.fullgraph
    q = GenerationRequest(messages=ask("fever?"), max_new_tokens=16)
    decoder = multi.decoder
    a0, a1 = (str(a) for a in adapters)
    alone = {a: decoder.generate([q], [a])[0].text for a in (a0, a1, None)}
    assert len(set(alone.values())) == 3, alone  # the adapters change the answers
    graphs = counters["stats"]["unique_graphs"]
    mixed = decoder.generate([q, q, q], [a1, None, a0])
    assert [g.text for g in mixed] == [alone[a1], alone[None], alone[a0]]
    third = str(_third_adapter(tiny_model, tmp_path / "job_2"))
    rows = decoder.generate([q, q], [third, a0])  # a1's slot is rewritten
    assert set(multi.slots.held()) == {a0, third} and multi.slots.loads["slot_evicted"] == 1
    assert rows[1].text == alone[a0] and rows[0].text not in alone.values()
    assert decoder.generate([q], [a1])[0].text == alone[a1]  # back, into a rewritten slot
    assert multi.slots.loads["slot_evicted"] == 2
    assert counters["stats"]["unique_graphs"] == graphs  # no new graph for new weights
    if not four_bit:  # peft's unmerged LoRA through generate(), eagerly (bf16 rounding aside)
        assert alone[a0][:8] == _eager_with_adapter(tiny_model, adapters[0], "fever?")[:8]


@pytest.mark.parametrize("four_bit", [False, True])
def test_the_multi_lora_lane_is_plain_under_unsloth_and_mixed_rows_answer_as_alone(
    tiny_model: Path, adapters: list[Path], four_bit: bool, unsloth_live: bool
) -> None:
    """Where peft's mixed-adapter batch went wrong (Unsloth's LoRA kernels ignore
    ``adapter_names``: 0 of 8 answers right in the GPU run), the lane has nothing of peft's
    and nothing on Unsloth's fast path: the stock transformers model (Unsloth gates its patched
    Llama forwards to the models it loaded), the stock rotary embedding, and its own batched
    LoRA layers. Different questions to different adapters (and the base) in one batch then
    answer token for token as each alone, on CUDA, in bf16 and over a 4-bit base."""
    if four_bit:
        pytest.importorskip("bitsandbytes")
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoTokenizer

    from core.inference.fast_multi import build_multi
    from core.inference.generate import GenerationRequest
    from core.inference.multi_lora import BatchedLoraLinear

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    multi = build_multi(
        str(tiny_model), tokenizer, four_bit=four_bit, rows=4, slots=4, cache_tokens=512
    )
    model = multi.decoder.model
    modules = list(model.modules())
    assert not hasattr(model, "peft_config")
    assert not any(isinstance(m, BaseTunerLayer) for m in modules)
    assert not any(getattr(m, "_unsloth_fast_path", False) for m in modules), unsloth_live
    assert sum(isinstance(m, BatchedLoraLinear) for m in modules) == 7 * 2  # 7 projections x 2
    assert type(model.model.rotary_emb).__module__ == type(model).__module__
    decoder = multi.decoder
    questions = _same_length_questions(decoder, 4)
    a0, a1 = (str(a) for a in adapters)
    rows = list(zip(questions, [a0, a1, None, a0], strict=True))

    def alone(question: str, adapter: str | None) -> str:
        request = GenerationRequest(messages=ask(question), max_new_tokens=16)
        return decoder.generate([request], [adapter])[0].text

    expected = [alone(q, a) for q, a in rows]
    assert alone(questions[0], a0) != alone(questions[0], a1)  # a mix-up would show
    mixed = decoder.generate(
        [GenerationRequest(messages=ask(q), max_new_tokens=16) for q, _ in rows],
        [a for _, a in rows],
    )
    assert [g.text for g in mixed] == expected


@pytest.mark.xfail(
    strict=False,
    reason="a shorter prompt is left-padded to the batch's longest: its prefill runs in another "
    "shape and its keys sit at other cache slots, and bf16 kernels may round differently there "
    "than alone (batch invariance is not promised; the CPU test, in float32, is exact)",
)
def test_mixed_rows_of_different_prompt_lengths_answer_as_alone(
    tiny_model: Path, adapters: list[Path], unsloth_live: bool
) -> None:
    from transformers import AutoTokenizer

    from core.inference.fast_multi import build_multi
    from core.inference.generate import GenerationRequest

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    multi = build_multi(str(tiny_model), tokenizer, four_bit=False, rows=4, cache_tokens=512)
    a0, a1 = (str(a) for a in adapters)
    rows = [("fever?", a0), ("the risk of anemia and heart pain?", a1), ("dose?", None)]

    def request(question: str) -> GenerationRequest:
        return GenerationRequest(messages=ask(question), max_new_tokens=16)

    expected = [multi.decoder.generate([request(q)], [a])[0].text for q, a in rows]
    mixed = multi.decoder.generate([request(q) for q, _ in rows], [a for _, a in rows])
    assert [g.text for g in mixed] == expected


def test_engine_batches_two_adapters_on_the_multi_lora_model(
    tiny_model: Path, adapters: list[Path], tmp_path: Path
) -> None:
    """Two adapters asked one after another: the second starts the base's multi-LoRA model;
    then concurrent questions to both share one batch there, answering as each did alone."""
    from core.base_models import resolve
    from core.inference.engine import InferenceEngine, InferenceRequest

    engine = InferenceEngine(models_dir=tmp_path, max_batch=4, batch_wait_s=0.3)

    def request(adapter: Path) -> InferenceRequest:
        return InferenceRequest(
            base_model=str(tiny_model),
            messages=ask("anemia?"),
            adapter_dir=str(adapter),
            adapter_name=adapter.name,
            load_in_4bit=False,
            max_new_tokens=12,
        )

    firsts = [engine.submit(request(a)).result() for a in adapters]
    assert {a["backend"] for a in firsts} == {"transformers"}
    base = resolve(str(tiny_model), models_dir=tmp_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not engine.fast.notes:
        if engine.fast.multi(base) and engine.fast.get(str(adapters[0])) and not engine.fast.busy:
            break
        time.sleep(0.5)
    assert engine.fast.multi(base) and engine.fast.get(str(adapters[0])), engine.fast.notes
    alone = [engine.submit(request(a)).result() for a in adapters]
    # Alone, the first adapter takes its own merged model; the second has none (the multi-LoRA
    # model serves it), so it answers from a batch of one there.
    assert [a["fast_path"] for a in alone] == ["merged_bf16", "multi_bf16"]
    together = [f.result() for f in [engine.submit(request(a)) for a in adapters]]
    assert [a["fast_path"] for a in together] == ["multi_bf16", "multi_bf16"]
    assert [a["batch_size"] for a in together] == [2, 2]
    assert together[1]["answer"] == alone[1]["answer"]
    assert together[0]["answer"][:8] == alone[0]["answer"][:8]  # merged vs unmerged: rounding
    assert together[0]["answer"] != together[1]["answer"]
