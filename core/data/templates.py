"""Built-in chat templates, each written from the model family's reference format.

Used when a tokenizer ships no template of its own (tokenizers built from the raw vocabulary
files in ``llama-models`` and ``mistral-common``, older checkpoints).
"""

from __future__ import annotations

# Meta-Llama-3-8B-Instruct: BOS once, a header per turn, a blank line, <|eot_id|> ends a turn.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# Mistral-7B-Instruct-v0.2 (mistral-common's tokenizer V1): <s> [INST] user [/INST] answer</s>.
# The spaces before [INST] and before the answer are what SentencePiece prepends to each piece
# mistral-common encodes on its own ("▁[", "▁A"); without them a tokenizer that adds no prefix
# space after special tokens gives other ids than the model was tuned on. It has no system role,
# so a system message is folded into the first user turn, as mistral-common does.
MISTRAL_V2 = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}"
    "{% set loop_messages = messages %}{% endif %}{{ bos_token }}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system %}"
    "{{ ' [INST] ' + system + '\n\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

# ChatML (SmolLM2, Qwen): <|im_start|>role\n...<|im_end|>\n
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma 1.1 it: <bos> once, <start_of_turn>user|model ... <end_of_turn>\n. Gemma has no system role
# (its own template raises on one), so a system message is folded into the first user turn.
GEMMA = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}"
    "{% set loop_messages = messages %}{% endif %}{{ bos_token }}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% set content = message['content'] | trim %}"
    "{% if loop.first and system %}{% set content = system + '\n\n' + content %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + content + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Llama-2-chat (meta-llama/Llama-2-7b-chat-hf's own template, without its role checks): every
# exchange is <s>[INST] user [/INST] answer </s>; the system text sits in a <<SYS>> block inside
# the first [INST]. Each user turn opens with its own BOS, as in Meta's reference chat_completion.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}"
    "{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.first and system %}"
    "{% set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content | trim + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

TEMPLATES = {
    "llama3": LLAMA3,
    "mistral_v2": MISTRAL_V2,
    "gemma": GEMMA,
    "llama2": LLAMA2,
    "chatml": CHATML,
}
