"""How long a request may be: the prompt, and the prompt plus max_new_tokens, must fit the
model's context, on every backend. Checked when the worker takes the request, before it waits
for the model thread: a prompt longer than the context is refused at once instead of running
for minutes and holding every request behind it.
"""

from __future__ import annotations

import ctypes
import json
import logging
import threading
from pathlib import Path
from typing import Any

from core.base_models import hub_call
from core.data.tokenize import ensure_chat_template, render
from core.errors import MedtuneError

# The longest context a llama.cpp model is given, whatever it trained with: its KV cache is
# allocated whole when the model loads (Llama 3.1's 131,072 tokens would take 16 GiB).
LLAMA_MAX_CTX = 32_768
_CONFIG_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


class ContextLengthExceeded(MedtuneError):
    code = "context_length_exceeded"
    status = 400


def check_fits(*, prompt_tokens: int, max_new_tokens: int, context: int, what: str) -> None:
    """Refuse a request that cannot fit ``context`` tokens, naming what is too long.

    ``what``: whose context it is ("the model's context", "the llama.cpp context").
    """
    if prompt_tokens >= context:  # not even one new token fits
        raise ContextLengthExceeded(
            f"the prompt is {prompt_tokens} tokens and {what} holds {context}: shorten the "
            "question or the messages",
            field="messages",
        )
    if prompt_tokens + max_new_tokens > context:
        raise ContextLengthExceeded(
            f"the prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) "
            f"exceed {what} of {context} tokens: set max_new_tokens to at most "
            f"{context - prompt_tokens}, or shorten the prompt",
            field="max_new_tokens",
        )


def config_context(config: dict[str, Any]) -> int | None:
    """The context length a Hugging Face config declares (None: it declares none)."""
    for key in _CONFIG_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    text = config.get("text_config")
    return config_context(text) if isinstance(text, dict) else None


def gguf_context(path: str) -> int | None:
    """A GGUF's training context (``<arch>.context_length``), read without loading tensors."""
    import llama_cpp

    # llama.cpp logs every load to stderr; its Python logger's level decides what is printed.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    if not model:
        return None
    try:
        buf = ctypes.create_string_buffer(256)

        def meta(key: str) -> str | None:
            found = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
            return buf.value.decode() if found >= 0 else None

        value = meta(f"{meta('general.architecture')}.context_length")
        return int(value) if value and value.isdigit() else None
    finally:
        llama_cpp.llama_model_free(model)


class PromptCounter:
    """Counts prompt tokens as the backends will see them, from any thread.

    It has tokenizers of its own: the model thread's are not shared, since a fast tokenizer
    refuses ("Already borrowed") to encode while another thread changes its padding.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokenizers: dict[str, Any] = {}
        self._contexts: dict[str, int | None] = {}

    def _tokenizer(self, path: str) -> Any:
        if path not in self._tokenizers:
            from transformers import AutoTokenizer

            tokenizer = hub_call(path, AutoTokenizer.from_pretrained, path)
            ensure_chat_template(tokenizer)
            self._tokenizers[path] = tokenizer
        return self._tokenizers[path]

    def count(
        self, model_path: str, messages: list[dict[str, str]], chat_template: str | None
    ) -> int:
        with self._lock:
            tokenizer = self._tokenizer(model_path)
            text = render(
                tokenizer, messages, add_generation_prompt=True, chat_template=chat_template
            )
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def model_context(self, model_path: str) -> int | None:
        """A Hugging Face model's context (its config's max_position_embeddings)."""
        with self._lock:
            if model_path not in self._contexts:
                config = Path(model_path) / "config.json"
                if config.is_file():
                    self._contexts[model_path] = config_context(json.loads(config.read_text()))
                else:  # a Hub id: the config comes from the Hub cache
                    from transformers import AutoConfig

                    loaded = hub_call(model_path, AutoConfig.from_pretrained, model_path)
                    self._contexts[model_path] = config_context(loaded.to_dict())
            return self._contexts[model_path]
