"""lora_config.modules_to_save: train the input embeddings and the LM head in full beside LoRA,
as Unsloth's continued-pretraining recipe does for new vocabulary or a new language.

A field of its own module (LoraSection inherits it) to keep core/spec/job.py within its size.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from core.spec.base import Section

EMBEDDING_MODULES = ("embed_tokens", "lm_head")


class EmbeddingFields(Section):
    modules_to_save: list[Literal["embed_tokens", "lm_head"]] = Field(
        default_factory=list,
        max_length=2,
        description="Modules trained in full beside the LoRA adapter, for continued pretraining "
        "(new vocabulary or a new language): 'embed_tokens' and/or 'lm_head'. Where the model "
        "ties them (SmolLM2) one trained copy serves both, whichever is named. Each is "
        "vocab_size x hidden_size weights, saved whole in the adapter (SmolLM2: 113 MB; "
        "Llama 3 8B: 2 GB each) and counted in the memory estimate. []: LoRA only.",
    )

    @field_validator("modules_to_save", mode="before")
    @classmethod
    def _distinct(cls, value: Any) -> Any:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(dict.fromkeys(value))
        return value
