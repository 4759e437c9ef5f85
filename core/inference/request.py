"""What a client asks the inference engine (core/inference/engine.py) for one answer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from core.inference.generate import GenerationRequest


@dataclass
class InferenceRequest:
    base_model: str
    messages: list[dict[str, str]]
    adapter_dir: str | None = None  # None: the base model answers
    adapter_name: str | None = None
    gguf_path: str | None = None  # a GGUF with the same weights (the llama.cpp backend)
    merged_dir: str | None = None  # merged weights (the CUDA static-cache backend)
    backend: str = "auto"
    load_in_4bit: bool = True  # CUDA only: load the base for adapters in 4-bit
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    on_delta: Callable[[str], None] | None = field(default=None, repr=False)
    on_start: Callable[[], None] | None = field(default=None, repr=False)  # the model began
    should_stop: Callable[[], bool] | None = field(default=None, repr=False)  # asked per token

    def generation(self, adapter: str | None) -> GenerationRequest:
        return GenerationRequest(
            messages=self.messages,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            stop=tuple(self.stop),
            adapter=adapter,
            on_delta=self.on_delta,
            should_stop=self.should_stop,
        )

    def cancelled(self) -> bool:
        return self.should_stop is not None and self.should_stop()
