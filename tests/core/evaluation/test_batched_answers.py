"""The evaluation answers its questions in batches (issue #20): on the real SmolLM2, greedy, the
batched answers are the one-at-a-time answers token for token, base and adapter alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.evaluation.run import answer_questions
from core.inference.generate import (
    GenerationRequest,
    answer_penalty,
    generate_batch,
    generate_one,
)

# Different lengths (so the batch is left-padded), in no length order; the short ones stop on
# their own within the token limit (base and adapter), the long ones run to it.
PROMPTS = [
    [{"role": "user", "content": "What is 2+2? Answer with a number only."}],
    [
        {"role": "system", "content": "You are a careful medical assistant. Be brief."},
        {"role": "user", "content": "What is the most common cause of iron deficiency anemia?"},
    ],
    [{"role": "user", "content": "What color is the sky? One word."}],
    [
        {
            "role": "user",
            "content": "A patient has had a fever, a dry cough and tiredness for three days, "
            "and lost the sense of smell. Which illnesses could this be, and what should they "
            "do first?",
        }
    ],
]
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def peft_model(model_dir: Path) -> Any:
    """SmolLM2 with a LoRA whose B matrices are not zero, so the adapter changes answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    return get_peft_model(model, config).eval()


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "adapter"])
def test_a_batch_answers_token_for_token_as_one_at_a_time(
    peft_model: Any, tokenizer: Any, adapter: bool
) -> None:
    name = peft_model.active_adapter if adapter else None
    requests = [
        GenerationRequest(messages=p, max_new_tokens=MAX_NEW_TOKENS, adapter=name) for p in PROMPTS
    ]
    alone = [generate_one(peft_model, tokenizer, r) for r in requests]
    together = generate_batch(peft_model, tokenizer, requests)
    for one, batched in zip(alone, together, strict=True):
        assert batched.token_ids == one.token_ids
        assert (batched.text, batched.stopped_on_eos, batched.completion_tokens) == (
            one.text,
            one.stopped_on_eos,
            one.completion_tokens,
        )
        assert batched.completion_tokens == len(batched.token_ids)
    # Rows stop on their own: nothing after a row's end of turn reaches its answer.
    stopped = [g for g in together if g.stopped_on_eos]
    assert len(stopped) >= 2 and all(g.completion_tokens < MAX_NEW_TOKENS for g in stopped)
    assert all(g.token_ids[-1] == tokenizer.eos_token_id for g in stopped)
    assert any(g.completion_tokens == MAX_NEW_TOKENS for g in together)
    if adapter:  # the adapter was on: its answer is not the base's
        base = generate_one(peft_model, tokenizer, GenerationRequest(PROMPTS[0], max_new_tokens=3))
        assert base.token_ids != alone[0].token_ids[:3]


def test_the_answer_penalty_scores_each_padded_row_as_alone() -> None:
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    prompts, answers = [[5, 3, 9, 3], [7, 1], [2, 2, 8]], [[4, 4], [3, 6], [1, 11]]
    width = max(len(p) for p in prompts)  # 0 pads on the left: a token no row holds
    rows = zip(prompts, answers, strict=True)
    ids = torch.tensor([[0] * (width - len(p)) + p + a for p, a in rows])
    scores = torch.randn(3, 12)
    scores[:, 0] = 5.0  # the padding token scores high: penalised, it would change ranks
    batched = answer_penalty(1.3, width)["logits_processor"][0](ids, scores.clone())
    for b, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        alone = RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=len(prompt))
        expected = alone(torch.tensor([prompt + answer]), scores[b : b + 1].clone())[0]
        assert torch.equal(batched[b], expected)
    assert batched[:, 0].tolist() == [5.0, 5.0, 5.0]
    assert batched[0, 9] == scores[0, 9] and batched[0, 4] != scores[0, 4]  # prompt / answer


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "adapter"])
def test_evaluation_batches_answer_in_question_order_with_the_penalty(
    peft_model: Any, tokenizer: Any, adapter: bool
) -> None:
    # A padded batch penalises each row's answer tokens, as one alone does. Sorted by length
    # into batches of 3 and 1, answered in order.
    ask: dict[str, Any] = {"max_new_tokens": 3, "repetition_penalty": 1.3, "adapter": adapter}
    one = answer_questions(peft_model, tokenizer, PROMPTS, batch_size=1, **ask)
    batched = answer_questions(peft_model, tokenizer, PROMPTS, batch_size=3, **ask)
    assert batched == one
    assert [a["question"] for a in batched] == [p[-1]["content"] for p in PROMPTS]


def test_a_batch_the_card_cannot_hold_is_answered_in_halves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An out-of-memory at batch 8 answers the batch in halves, in question order; one question
    that does not fit still fails (the card cannot answer it at all)."""
    import torch

    import core.inference.generate as generate

    sizes: list[int] = []

    def fake_batch(model: Any, tokenizer: Any, requests: list[Any]) -> list[Any]:
        sizes.append(len(requests))
        if len(requests) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return [
            generate.Generation(
                text=r.messages[-1]["content"].upper(),
                finish_reason="stop",
                prompt_tokens=1,
                completion_tokens=1,
                stopped_on_eos=True,
                seconds=0.0,
                first_token_seconds=None,
            )
            for r in requests
        ]

    monkeypatch.setattr(generate, "generate_batch", fake_batch)
    prompts = [[{"role": "user", "content": f"q{i}" + " x" * i}] for i in range(8)]
    out = answer_questions(None, None, prompts, max_new_tokens=4, batch_size=8)
    assert [a["answer"] for a in out] == [p[0]["content"].upper() for p in prompts]
    assert sizes == [8, 4, 2, 2, 4, 2, 2]

    def never_fits(model: Any, tokenizer: Any, requests: list[Any]) -> list[Any]:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")

    monkeypatch.setattr(generate, "generate_batch", never_fits)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        answer_questions(None, None, prompts[:2], max_new_tokens=4, batch_size=2)
