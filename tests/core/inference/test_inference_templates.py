"""An adapter is asked in the chat template it was trained with, not the base model's.

A job may train with another template than the base tokenizer's own (``chat_template`` in the
spec); its adapter folder keeps the tokenizer it trained with. The engine shares one base model
between adapters, so it must render each request by the adapter's saved template.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.data.tokenize import render, saved_chat_template
from core.inference.engine import InferenceEngine
from tests.core.inference.test_inference import BASE, ask, make_adapter

# A plain template the base never uses: its prompts have another length than ChatML's.
PLAIN = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def plain_adapter(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    out = make_adapter(model_dir, tmp_path_factory.mktemp("plain") / "job_plain", seed=5)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = PLAIN
    tokenizer.save_pretrained(out)  # as the pipeline saves the trained tokenizer beside it
    return out


def test_the_adapter_folder_keeps_its_template(plain_adapter: Path, tmp_path: Path) -> None:
    assert saved_chat_template(plain_adapter) == PLAIN
    assert saved_chat_template(tmp_path) is None  # no tokenizer saved: the base's is used


def test_an_adapter_is_asked_in_its_own_template(
    model_cache: Path, model_dir: Path, plain_adapter: Path, tokenizer
) -> None:  # type: ignore[no-untyped-def]
    engine = InferenceEngine(models_dir=model_cache, max_batch=1)
    question = ask("What is anemia?")

    def prompt_tokens(adapter: Path | None) -> int:
        result = engine.answer(
            base_model=BASE,
            messages=question,
            adapter_dir=str(adapter) if adapter else None,
            adapter_name=adapter.name if adapter else None,
            max_new_tokens=2,
            backend="transformers",
        )
        return int(result["usage"]["prompt_tokens"])

    def length(template: str | None) -> int:
        text = render(tokenizer, question, add_generation_prompt=True, chat_template=template)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    assert length(PLAIN) != length(None)
    assert prompt_tokens(plain_adapter) == length(PLAIN)
    assert prompt_tokens(None) == length(None)  # the base keeps its own template
