"""The repetition penalty falls on the answer's own tokens, not the prompt's (issue #20).

transformers' own penalty counts every prompt token, the end-of-turn token that closes each chat
turn among them: at 1.3 SmolLM2 then no longer says "The sky is a beautiful shade of blue." and
stops, but rambles past the token limit. llama.cpp's sampler never saw the prompt, so the two
backends answered the same question differently under /infer's default penalty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.inference.generate import GenerationRequest, generate_one

SKY = [{"role": "user", "content": "What color is the sky? One word."}]


@pytest.fixture(scope="module")
def base(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_a_penalised_short_answer_is_the_plain_one_and_still_stops(
    base: Any, tokenizer: Any
) -> None:
    plain = generate_one(base, tokenizer, GenerationRequest(SKY, max_new_tokens=16))
    assert plain.stopped_on_eos and plain.completion_tokens < 16  # the case is a short answer
    for penalty in (1.1, 1.3, 2.0):
        asked = GenerationRequest(SKY, max_new_tokens=16, repetition_penalty=penalty)
        penalised = generate_one(base, tokenizer, asked)
        assert penalised.text == plain.text and penalised.stopped_on_eos


def _distinct(text: str) -> float:
    words = text.lower().split()
    return len(set(words)) / len(words)


def test_the_penalty_still_falls_on_what_the_answer_repeats(base: Any, tokenizer: Any) -> None:
    long = [{"role": "user", "content": "Describe anemia, its causes and its treatment."}]
    plain = generate_one(base, tokenizer, GenerationRequest(long, max_new_tokens=48))
    asked = GenerationRequest(long, max_new_tokens=48, repetition_penalty=1.3)
    penalised = generate_one(base, tokenizer, asked)
    assert penalised.text != plain.text
    assert _distinct(penalised.text) > _distinct(plain.text)  # it repeats itself less
