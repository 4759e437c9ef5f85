"""Chat templates: golden strings for a two-turn example, real tokenizers, answer-only masks."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from core.data.example import Example
from core.data.gate import token_rules
from core.data.templates import CHATML, GEMMA, LLAMA2, LLAMA3, MISTRAL_V2, TEMPLATES
from core.data.tokenize import IGNORE_INDEX, encode, ensure_chat_template

TWO_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a fever?"},
    {"role": "assistant", "content": "A high temperature."},
    {"role": "user", "content": "When is it serious?"},
    {"role": "assistant", "content": "Above 40 C."},
]

GOLDEN = {
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is a fever?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA high temperature.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhen is it serious?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nAbove 40 C.<|eot_id|>"
    ),
    "mistral_v2": (  # mistral-common's V1 string (test_data_templates_reference.py: the ids)
        "<s> [INST] Be brief.\n\nWhat is a fever? [/INST] A high temperature.</s>"
        " [INST] When is it serious? [/INST] Above 40 C.</s>"
    ),
    "gemma": (
        "<bos><start_of_turn>user\nBe brief.\n\nWhat is a fever?<end_of_turn>\n"
        "<start_of_turn>model\nA high temperature.<end_of_turn>\n"
        "<start_of_turn>user\nWhen is it serious?<end_of_turn>\n"
        "<start_of_turn>model\nAbove 40 C.<end_of_turn>\n"
    ),
    "llama2": (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is a fever? [/INST]"
        " A high temperature. </s>"
        "<s>[INST] When is it serious? [/INST] Above 40 C. </s>"
    ),
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is a fever?<|im_end|>\n"
        "<|im_start|>assistant\nA high temperature.<|im_end|>\n"
        "<|im_start|>user\nWhen is it serious?<|im_end|>\n"
        "<|im_start|>assistant\nAbove 40 C.<|im_end|>\n"
    ),
}
SPECIAL = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral_v2": ("<s>", "</s>"),
    "gemma": ("<bos>", "<eos>"),
    "llama2": ("<s>", "</s>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
}


def jinja(template: str, messages: list[dict[str, str]], name: str, **kwargs: Any) -> str:
    """Render the way transformers does (sandboxed, trim_blocks, lstrip_blocks)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    bos, eos = SPECIAL[name]
    return env.from_string(template).render(
        messages=messages, bos_token=bos, eos_token=eos, **kwargs
    )


def trained_runs(tokenizer: Any, enc: Any) -> list[str]:
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for tok, lab in zip(enc.input_ids, enc.labels, strict=True):
        if lab != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(tok)
        previous = lab
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_each_builtin_template_renders_its_golden_string(name: str) -> None:
    assert jinja(TEMPLATES[name], TWO_TURN, name) == GOLDEN[name]


@pytest.mark.parametrize(
    ("name", "prompt"),
    [
        ("llama3", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        ("gemma", "<start_of_turn>model\n"),
        ("chatml", "<|im_start|>assistant\n"),
        ("mistral_v2", "[/INST]"),
        ("llama2", "[/INST]"),
    ],
)
def test_generation_prompt_is_the_assistant_header(name: str, prompt: str) -> None:
    text = jinja(TEMPLATES[name], TWO_TURN[:4], name, add_generation_prompt=True)
    assert text.endswith(prompt)
    assert GOLDEN[name].startswith(text)  # the prompt is a prefix of the full rendering


@pytest.mark.parametrize("name", ["gemma", "mistral_v2"])
def test_templates_without_a_system_role_fold_it_into_the_first_user_turn(name: str) -> None:
    text = jinja(TEMPLATES[name], TWO_TURN, name)
    assert "system" not in text
    assert text.count("Be brief.") == 1
    assert text.index("Be brief.") < text.index("What is a fever?")
    no_system = jinja(TEMPLATES[name], TWO_TURN[1:], name)
    assert "Be brief." not in no_system


def test_llama2_without_system_has_no_sys_block() -> None:
    assert "<<SYS>>" not in jinja(LLAMA2, TWO_TURN[1:], "llama2")


def test_llama3_real_tokenizer_masks_exactly_the_answers(real: dict[str, Any]) -> None:
    tok = real["llama3"]
    assert tok.chat_template == LLAMA3
    assert tok.apply_chat_template(TWO_TURN, tokenize=False) == GOLDEN["llama3"]
    enc = encode(tok, Example(messages=TWO_TURN), max_length=512)
    assert enc.input_ids.count(tok.bos_token_id) == 1 and enc.input_ids[0] == tok.bos_token_id
    assert enc.input_ids.count(tok.convert_tokens_to_ids("<|eot_id|>")) == 5
    assert trained_runs(tok, enc) == ["A high temperature.<|eot_id|>", "Above 40 C.<|eot_id|>"]
    rules = token_rules(tok)
    assert (rules.bos_id, rules.bos_per_user_turn, rules.eot_token) == (128000, False, "<|eot_id|>")


def test_mistral_real_tokenizer_masks_exactly_the_answers(real: dict[str, Any]) -> None:
    tok = real["mistral_v2"]
    assert tok.chat_template == MISTRAL_V2
    assert tok.apply_chat_template(TWO_TURN, tokenize=False) == GOLDEN["mistral_v2"]
    enc = encode(tok, Example(messages=TWO_TURN), max_length=512)
    assert enc.input_ids[0] == tok.bos_token_id == 1
    assert enc.input_ids.count(1) == 1 and enc.input_ids.count(2) == 2
    assert trained_runs(tok, enc) == ["A high temperature.</s>", "Above 40 C.</s>"]
    rules = token_rules(tok)
    assert (rules.bos_id, rules.eot_token) == (1, "</s>")


def test_llama2_with_a_sentencepiece_tokenizer_opens_each_exchange_with_bos(
    real: dict[str, Any],
) -> None:
    tok = copy.deepcopy(real["mistral_v2"])  # the same <s> and </s> as Llama 2
    assert ensure_chat_template(tok, "llama2") == "llama2"
    enc = encode(tok, Example(messages=TWO_TURN), max_length=512)
    assert enc.input_ids.count(1) == 2 and enc.input_ids.count(2) == 2
    assert trained_runs(tok, enc) == ["A high temperature. </s>", "Above 40 C. </s>"]
    rules = token_rules(tok)
    assert rules.bos_per_user_turn and rules.eot_id == 2


def test_smollm2_own_template_and_builtin_chatml_agree(tokenizer: Any) -> None:
    assert tokenizer.apply_chat_template(TWO_TURN, tokenize=False) == GOLDEN["chatml"]
    own = encode(tokenizer, Example(messages=TWO_TURN), max_length=512)
    chatml = copy.deepcopy(tokenizer)
    assert ensure_chat_template(chatml, "chatml") == "chatml" and chatml.chat_template == CHATML
    assert encode(chatml, Example(messages=TWO_TURN), max_length=512).input_ids == own.input_ids
    assert trained_runs(tokenizer, own) == [
        "A high temperature.<|im_end|>",
        "Above 40 C.<|im_end|>",
    ]
    rules = token_rules(tokenizer)
    assert rules.bos_id is None  # <|im_start|> opens every turn: no sequence BOS to count
    assert rules.eot_token == "<|im_end|>"


def test_auto_keeps_the_tokenizer_template_and_a_choice_replaces_it(tokenizer: Any) -> None:
    tok = copy.deepcopy(tokenizer)
    own = tok.chat_template
    assert ensure_chat_template(tok, "auto") == "tokenizer" and tok.chat_template == own
    assert ensure_chat_template(tok, "gemma") == "gemma" and tok.chat_template == GEMMA
    tok.chat_template = None
    assert ensure_chat_template(tok, "auto") == "chatml" and tok.chat_template == CHATML


def test_train_on_prompt_trains_every_token(real: dict[str, Any]) -> None:
    tok = real["llama3"]
    enc = encode(tok, Example(messages=TWO_TURN), max_length=512, train_on_prompt=True)
    assert enc.labels == enc.input_ids
    assert enc.answer_spans == encode(tok, Example(messages=TWO_TURN), max_length=512).answer_spans


def test_answer_token_spans_match_the_labels(real: dict[str, Any]) -> None:
    tok = real["llama3"]
    enc = encode(tok, Example(messages=TWO_TURN), max_length=512)
    trained = [i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX]
    assert trained == [i for start, end in enc.answer_spans for i in range(start, end)]
