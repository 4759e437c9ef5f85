"""Built-in chat templates against the references the models ship or were tuned with.

- Gemma 1.1 it and Llama 2 chat: the Jinja ``chat_template`` of their tokenizer_config.json,
  copied below and rendered the way transformers renders (sandboxed, trim_blocks, lstrip_blocks,
  raise_exception, bos_token/eos_token).
- Llama 3 Instruct: token ids from ``llama-models``' own ChatFormat.
- Mistral 7B Instruct v0.2: token ids from ``mistral-common``'s tokenizer V1 (the one for
  open-mistral-7b, Mistral 7B Instruct v0.1/v0.2).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from core.data.example import Example
from core.data.templates import GEMMA, LLAMA2, LLAMA3, MISTRAL_V2
from core.data.tokenize import IGNORE_INDEX, encode, ensure_chat_template, render

# google/gemma-1.1-7b-it, tokenizer_config.json "chat_template" (the template of the Gemma 1 it
# checkpoints: google/gemma-7b-it and gemma-2b-it carry the same string). Taken verbatim from
# public copies of those files (e.g. the template test tables of mistral.rs and swift-jinja),
# since the Hub is not reachable from here.
GEMMA_IT_OFFICIAL = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# meta-llama/Llama-2-7b-chat-hf, tokenizer_config.json "chat_template" (the same string in the
# 13b and 70b chat repos); the '\\n' escapes are in the JSON file itself and Jinja turns them
# into newlines.
LLAMA2_CHAT_OFFICIAL = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

SYSTEM = {"role": "system", "content": "Be brief."}
CONVERSATIONS = [
    [
        {"role": "user", "content": "What is a fever?"},
        {"role": "assistant", "content": "A high temperature."},
    ],
    [
        {"role": "user", "content": "What is a fever?"},
        {"role": "assistant", "content": "A high temperature."},
        {"role": "user", "content": "When is it serious?"},
        {"role": "assistant", "content": "Above 40 C."},
    ],
    [  # whitespace the templates trim, lines, non-ASCII
        {"role": "user", "content": "  Symptoms of anémie?\n\n- tired\n- pale  "},
        {"role": "assistant", "content": "\tFatigue, pallor and shortness of breath.\n"},
        {"role": "user", "content": "Treatment?"},
        {"role": "assistant", "content": "Iron; see a doctor. "},
    ],
]


def _raise(message: str) -> None:
    raise TemplateError(message)


def hf_render(
    template: str, messages: list[dict[str, str]], *, bos: str, eos: str, **kw: Any
) -> str:
    """Render as transformers' apply_chat_template does (its _compile_jinja_template)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template).render(messages=messages, bos_token=bos, eos_token=eos, **kw)


def folded(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The system text moved into the first user turn, the way the built-in Gemma does it."""
    system, first, *rest = messages
    content = system["content"].strip() + "\n\n" + first["content"].strip()
    return [{"role": "user", "content": content}, *rest]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("generation", [False, True])
def test_gemma_matches_the_official_template(
    conversation: list[dict[str, str]], generation: bool
) -> None:
    kw = {"bos": "<bos>", "eos": "<eos>"}
    messages = conversation[:-1] if generation else conversation
    ours = hf_render(GEMMA, messages, add_generation_prompt=generation, **kw)
    assert ours == hf_render(GEMMA_IT_OFFICIAL, messages, add_generation_prompt=generation, **kw)
    # The official template refuses a system turn; the built-in folds it into the first turn.
    with pytest.raises(TemplateError, match="System role not supported"):
        hf_render(GEMMA_IT_OFFICIAL, [SYSTEM, *messages], **kw)
    with_system = hf_render(GEMMA, [SYSTEM, *messages], add_generation_prompt=generation, **kw)
    official = hf_render(
        GEMMA_IT_OFFICIAL, folded([SYSTEM, *messages]), add_generation_prompt=generation, **kw
    )
    assert with_system == official


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("system", [True, False])
def test_llama2_matches_the_official_template(
    conversation: list[dict[str, str]], system: bool
) -> None:
    messages = [SYSTEM, *conversation] if system else conversation
    kw = {"bos": "<s>", "eos": "</s>"}
    assert hf_render(LLAMA2, messages, **kw) == hf_render(LLAMA2_CHAT_OFFICIAL, messages, **kw)
    prompt = messages[:-1]
    assert hf_render(LLAMA2, prompt, add_generation_prompt=True, **kw) == hf_render(
        LLAMA2_CHAT_OFFICIAL, prompt, add_generation_prompt=True, **kw
    )


# --- token ids against the model makers' own code ------------------------------------------------


def llama_models_ids(messages: list[dict[str, str]], *, generation: bool) -> list[int]:
    from llama_models.datatypes import RawMessage, StopReason
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    from bench.real_tokenizers import package_file

    fmt = ChatFormat(Tokenizer(package_file("llama_models", "llama3/tokenizer.model")))
    raw = [
        RawMessage(
            role=m["role"],  # type: ignore[arg-type]
            content=m["content"],
            stop_reason=StopReason.end_of_turn if m["role"] == "assistant" else None,
        )
        for m in messages
    ]
    if generation:  # the prompt a model answers: BOS, the turns, the assistant header
        return fmt.encode_dialog_prompt(raw).tokens
    ids = [fmt.tokenizer.special_tokens["<|begin_of_text|>"]]
    for message in raw:
        ids += fmt.encode_message(message, tool_prompt_format=None)[0]  # type: ignore[arg-type]
    return ids


def mistral_common_ids(messages: list[dict[str, str]]) -> tuple[list[int], list[list[int]]]:
    """The prompt before the last answer, and each answer's ids (EOS included)."""
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    tokenizer = MistralTokenizer.v1()
    typed = [kinds[m["role"]](content=m["content"]) for m in messages]
    prompt = tokenizer.encode_chat_completion(ChatCompletionRequest(messages=typed[:-1])).tokens
    instruct = tokenizer.instruct_tokenizer
    answers = [
        instruct.encode_assistant_message(m, is_before_last_user_message=False)
        for m in typed
        if isinstance(m, AssistantMessage)
    ]
    return prompt, answers


def ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def trained_runs(enc: Any) -> list[list[int]]:
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for tok, lab in zip(enc.input_ids, enc.labels, strict=True):
        if lab != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(tok)
        previous = lab
    return runs


@pytest.mark.parametrize("conversation", CONVERSATIONS[:2])
@pytest.mark.parametrize("system", [True, False])
def test_llama3_ids_match_llama_models(
    real: dict[str, Any], conversation: list[dict[str, str]], system: bool
) -> None:
    tok = real["llama3"]
    assert tok.chat_template == LLAMA3
    messages = [SYSTEM, *conversation] if system else conversation
    assert ids(tok, render(tok, messages)) == llama_models_ids(messages, generation=False)
    prompt = messages[:-1]
    assert ids(tok, render(tok, prompt, add_generation_prompt=True)) == llama_models_ids(
        prompt, generation=True
    )
    # The labels train exactly the reference's answer tokens, <|eot_id|> included.
    enc = encode(tok, Example(messages=messages), max_length=1024)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    expected = [
        [*ids(tok, m["content"].strip()), eot] for m in messages if m["role"] == "assistant"
    ]
    assert trained_runs(enc) == expected


@pytest.mark.parametrize("conversation", CONVERSATIONS[:2])
def test_mistral_ids_match_mistral_common(
    real: dict[str, Any], conversation: list[dict[str, str]]
) -> None:
    tok = real["mistral_v2"]
    assert tok.chat_template == MISTRAL_V2
    messages = [SYSTEM, *conversation]
    prompt, answers = mistral_common_ids(messages)
    assert ids(tok, render(tok, messages[:-1], add_generation_prompt=True)) == prompt
    assert ids(tok, render(tok, messages)) == prompt + answers[-1]
    enc = encode(tok, Example(messages=messages), max_length=1024)
    assert enc.input_ids == prompt + answers[-1]
    assert trained_runs(enc) == answers  # each answer and its </s>, nothing of the prompt


def test_llama2_masks_cover_exactly_the_answers(real: dict[str, Any]) -> None:
    tok = copy.deepcopy(real["mistral_v2"])  # the same SentencePiece <s> and </s> as Llama 2
    ensure_chat_template(tok, "llama2")
    messages = [SYSTEM, *CONVERSATIONS[1]]
    enc = encode(tok, Example(messages=messages), max_length=1024)
    full = ids(tok, hf_render(LLAMA2_CHAT_OFFICIAL, messages, bos="<s>", eos="</s>"))
    assert enc.input_ids == full
    assert [tok.decode(run) for run in trained_runs(enc)] == [
        "A high temperature. </s>",
        "Above 40 C. </s>",
    ]
