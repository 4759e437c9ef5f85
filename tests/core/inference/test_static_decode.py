"""The fast path's own decode loop (core/inference/static_decode.py), run eagerly on the CPU.

On a GPU the same loop replays a CUDA graph per token (tests/gpu/test_inference_gpu.py); here
it must answer token for token like ``generate`` with the embedded SmolLM2, stop where
``generate`` stops, and refuse what does not fit its cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.errors import MedtuneError
from core.inference.generate import GenerationRequest, generate_one
from core.inference.static_decode import StaticDecoder
from tests.core.inference.test_inference import QUESTIONS, ask


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def decoder(loaded: tuple[Any, Any]) -> StaticDecoder:
    model, tokenizer = loaded
    return StaticDecoder(model, tokenizer, max_cache_tokens=256, compile=False)


@pytest.mark.parametrize("question", QUESTIONS[:2])
def test_greedy_answer_equals_generate(
    loaded: tuple[Any, Any], decoder: StaticDecoder, question: str
) -> None:
    model, tokenizer = loaded
    request = GenerationRequest(messages=ask(question), max_new_tokens=24)
    reference = generate_one(model, tokenizer, request)
    deltas: list[str] = []
    ours = decoder.generate(
        GenerationRequest(messages=ask(question), max_new_tokens=24, on_delta=deltas.append)
    )
    assert ours.text == reference.text
    assert ours.completion_tokens == reference.completion_tokens
    assert ours.prompt_tokens == reference.prompt_tokens
    assert ours.finish_reason == reference.finish_reason
    assert "".join(deltas) == ours.text
    assert ours.first_token_seconds is not None and ours.first_token_seconds <= ours.seconds


def test_the_cache_is_reset_between_requests(decoder: StaticDecoder) -> None:
    """A second, different question must not see the first one's keys and values."""
    first = decoder.generate(GenerationRequest(messages=ask(QUESTIONS[0]), max_new_tokens=12))
    other = decoder.generate(GenerationRequest(messages=ask(QUESTIONS[1]), max_new_tokens=12))
    again = decoder.generate(GenerationRequest(messages=ask(QUESTIONS[0]), max_new_tokens=12))
    assert first.text == again.text != other.text


def test_stops_at_end_of_turn(decoder: StaticDecoder) -> None:
    """SmolLM2 answers "Hi" briefly: the loop ends on <|im_end|> before the token limit."""
    gen = decoder.generate(
        GenerationRequest(messages=[{"role": "user", "content": "Say hi."}], max_new_tokens=200)
    )
    assert gen.stopped_on_eos and gen.finish_reason == "stop"
    assert gen.completion_tokens < 200
    assert "<|im_end|>" not in gen.text


def test_stop_strings_cut_the_answer(decoder: StaticDecoder) -> None:
    full = decoder.generate(GenerationRequest(messages=ask(QUESTIONS[0]), max_new_tokens=16))
    stop = " " + full.text.split()[3]
    cut = decoder.generate(
        GenerationRequest(messages=ask(QUESTIONS[0]), max_new_tokens=16, stop=(stop,))
    )
    assert cut.finish_reason == "stop" and not cut.stopped_on_eos
    assert cut.text == full.text[: full.text.index(stop)].strip()


def test_sampling_draws_from_the_top_p_head(decoder: StaticDecoder) -> None:
    """top_p so small that only the most likely token survives: sampling equals greedy."""
    greedy = decoder.generate(GenerationRequest(messages=ask(QUESTIONS[0]), max_new_tokens=10))
    narrow = decoder.generate(
        GenerationRequest(
            messages=ask(QUESTIONS[0]), max_new_tokens=10, temperature=1.0, top_p=1e-6
        )
    )
    assert narrow.text == greedy.text


def test_a_prompt_that_does_not_fit_the_cache_is_refused(decoder: StaticDecoder) -> None:
    with pytest.raises(MedtuneError) as caught:
        decoder.generate(GenerationRequest(messages=ask("fever " * 300), max_new_tokens=8))
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.field == "max_new_tokens"


def test_a_rotary_class_swapped_by_unsloth_is_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unsloth replaces transformers' rotary class process-wide with one that reads a position
    back to the host; the static path rebuilds the stock module, with the same outputs."""
    import torch
    import transformers.models.llama.modeling_llama as llama
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.inference.cuda import restore_stock_rotary

    class HostReadingRotary(llama.LlamaRotaryEmbedding):
        def forward(self, x: Any, position_ids: Any) -> Any:
            self.rows = int(position_ids.max()) + 1  # the host read CUDA graphs cannot hold
            return super().forward(x, position_ids)

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()
    monkeypatch.setattr(llama, "LlamaRotaryEmbedding", HostReadingRotary)
    torch.manual_seed(0)
    swapped = LlamaForCausalLM(config).eval()
    assert type(swapped.model.rotary_emb) is HostReadingRotary

    assert restore_stock_rotary(swapped)
    rotary = type(swapped.model.rotary_emb)
    assert rotary.__name__ == "LlamaRotaryEmbedding" and rotary.__module__ == llama.__name__
    assert rotary is not HostReadingRotary
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(swapped(ids).logits, reference(ids).logits)
    assert not restore_stock_rotary(reference)  # a stock model is left alone


def test_repetition_penalty_answers_like_generate(
    loaded: tuple[Any, Any], decoder: StaticDecoder
) -> None:
    """The fast path's on-device penalty is transformers' own: the same tokens, greedy."""
    model, tokenizer = loaded
    plain = GenerationRequest(messages=ask(QUESTIONS[0]), max_new_tokens=48)
    penalised = GenerationRequest(
        messages=ask(QUESTIONS[0]), max_new_tokens=48, repetition_penalty=1.3
    )
    reference = generate_one(model, tokenizer, penalised)
    ours = decoder.generate(penalised)
    assert ours.text == reference.text
    assert ours.completion_tokens == reference.completion_tokens
    # And it is not a no-op: without the penalty the greedy answer differs.
    assert generate_one(model, tokenizer, plain).text != reference.text
