"""One way to render, generate and stop: used by the inference engine, evaluation and exports.

``generate_batch`` answers several chat requests with one padded ``generate`` call (left
padding, so every row's prompt ends where generation starts). Each row stops on its own: at
the end-of-turn token, at its own ``max_new_tokens``, or at one of its ``stop`` strings (cut
out of the answer, as OpenAI does). Text streams out per row as it is produced, holding back
what could still become a stop string or an incomplete UTF-8 character, so the deltas of a row
always add up to its final answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

from core.data.tokenize import render

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
FinishReason = Literal["stop", "length"]


@dataclass
class GenerationRequest:
    messages: list[dict[str, str]]
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    adapter: str | None = None  # a loaded peft adapter's name; None answers with the base model
    on_delta: Callable[[str], None] | None = None  # called with each new piece of answer text
    # Benchmarks only: decode all max_new_tokens even past the end of turn (random weights end
    # anywhere). The static decoder honours it; generate() takes min_new_tokens instead.
    ignore_eos: bool = False
    # The template the adapter was trained with (its saved tokenizer's), when it is not the
    # base tokenizer's own: a batch shares one base model but each row renders as it trained.
    chat_template: str | None = None

    def sampling_key(self) -> tuple[bool, float, float]:
        """Requests batch together only if generate() would sample them alike."""
        if self.temperature > 0:
            return (True, self.temperature, self.top_p)
        return (False, 0.0, 1.0)


@dataclass
class Generation:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int  # the end-of-turn token counts, as generate() produced it
    stopped_on_eos: bool
    seconds: float
    first_token_seconds: float | None

    def as_result(self, **extra: Any) -> dict[str, Any]:
        """The dict the engine, the worker task and the API pass along."""
        return {
            "answer": self.text,
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
            },
            "generation_seconds": round(self.seconds, 4),
            "time_to_first_token_s": (
                round(self.first_token_seconds, 4) if self.first_token_seconds is not None else None
            ),
            "tokens_per_second": (
                round(self.completion_tokens / self.seconds, 2) if self.seconds > 0 else None
            ),
            **extra,
        }


@dataclass
class TextTracker:
    """Turns one row's token ids into answer text, deltas and a stop decision."""

    tokenizer: Any
    stop: tuple[str, ...]
    eos_token_id: int | None
    max_new_tokens: int
    on_delta: Callable[[str], None] | None = None
    ids: list[int] = field(default_factory=list)
    sent: str = ""
    text: str = ""
    finish_reason: FinishReason | None = None
    stopped_on_eos: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token_id: int) -> None:
        if self.done:
            return
        self.ids.append(token_id)
        if token_id == self.eos_token_id:
            self.stopped_on_eos = True
            self._finish("stop", self._decode())
            return
        text = self._decode()
        cut = _first_stop(text, self.stop)
        if cut is not None:
            self._finish("stop", text[:cut])
        elif len(self.ids) >= self.max_new_tokens:
            self._finish("length", text)
        else:
            self.text = text
            self._emit(text[: _safe_length(text, self.stop)])

    def finish(self, reason: FinishReason) -> None:
        """Generation ended by itself (a backend's own end-of-turn or token limit)."""
        if not self.done:
            self._finish(reason, self.text)

    def _decode(self) -> str:
        ids = self.ids[:-1] if self.ids and self.ids[-1] == self.eos_token_id else self.ids
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _finish(self, reason: FinishReason, text: str) -> None:
        self.finish_reason = reason
        self.text = text
        self._emit(text)

    def _emit(self, visible: str) -> None:
        # The answer is the text stripped of surrounding whitespace: leading whitespace is never
        # sent and trailing whitespace waits until more text follows it.
        visible = visible.strip()
        if len(visible) > len(self.sent) and visible.startswith(self.sent):
            delta = visible[len(self.sent) :]
            self.sent = visible
            if self.on_delta is not None:
                self.on_delta(delta)

    @property
    def answer(self) -> str:
        return self.text.strip()


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _safe_length(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be shown: not a trailing partial character or stop string."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence so far
        end -= 1
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end -= k
                break
    return end


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def _adapter_context(
    model: Any, requests: Sequence[GenerationRequest]
) -> tuple[Any, dict[str, Any]]:
    """One adapter (or none) for the whole batch is set directly; a mix goes per row."""
    adapters = {r.adapter for r in requests}
    if not is_peft(model):
        return nullcontext(), {}
    if len(adapters) == 1:
        (only,) = adapters
        if only is None:
            return model.disable_adapter(), {}
        if model.active_adapter != only:
            model.set_adapter(only)
        return nullcontext(), {}
    # peft's mixed-adapter batch: each row runs through its own adapter (or none).
    return nullcontext(), {"adapter_names": [r.adapter or BASE_ADAPTER for r in requests]}


class _RowStops:
    """A StoppingCriteria: feeds each row's newest token to its tracker, stops finished rows."""

    def __init__(self, trackers: list[TextTracker], started: float) -> None:
        self.trackers = trackers
        self.started = started
        self.first_token_at: float | None = None

    def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
        import torch

        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        newest = input_ids[:, -1].tolist()
        for tracker, token in zip(self.trackers, newest, strict=True):
            tracker.add(int(token))
        return torch.tensor([t.done for t in self.trackers], device=input_ids.device)


def generate_batch(
    model: Any,
    tokenizer: Any,
    requests: Sequence[GenerationRequest],
    *,
    generate_kwargs: dict[str, Any] | None = None,
) -> list[Generation]:
    """Answer ``requests`` (same sampling settings) with one left-padded ``generate`` call."""
    import torch
    from transformers import StoppingCriteriaList

    if len({r.sampling_key() for r in requests}) != 1:
        raise ValueError("a batch must share temperature and top_p; group requests first")
    texts = [
        render(tokenizer, r.messages, add_generation_prompt=True, chat_template=r.chat_template)
        for r in requests
    ]
    if tokenizer.pad_token_id is None:  # a batch needs padding; masked, so any token does
        tokenizer.pad_token = tokenizer.eos_token
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        inputs = tokenizer(
            texts, add_special_tokens=False, return_tensors="pt", padding=len(texts) > 1
        ).to(model.device)
    finally:
        tokenizer.padding_side = side
    prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
    eos = tokenizer.eos_token_id
    trackers = [
        TextTracker(
            tokenizer,
            stop=tuple(r.stop),
            eos_token_id=eos,
            max_new_tokens=r.max_new_tokens,
            on_delta=r.on_delta,
        )
        for r in requests
    ]
    do_sample, temperature, top_p = requests[0].sampling_key()
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if do_sample
        else {"do_sample": False}
    )
    context, extra = _adapter_context(model, requests)
    started = time.perf_counter()
    stops = _RowStops(trackers, started)
    with torch.inference_mode(), context:
        model.generate(
            **inputs,
            max_new_tokens=max(r.max_new_tokens for r in requests),
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
            stopping_criteria=StoppingCriteriaList([stops]),
            **sampling,
            **extra,
            **(generate_kwargs or {}),
        )
    seconds = time.perf_counter() - started
    first = stops.first_token_at - started if stops.first_token_at is not None else None
    results = []
    for tracker, prompt in zip(trackers, prompt_tokens, strict=True):
        tracker.finish("length")  # a row generate() ended without our trackers deciding
        results.append(
            Generation(
                text=tracker.answer,
                finish_reason=tracker.finish_reason or "length",
                prompt_tokens=int(prompt),
                completion_tokens=len(tracker.ids),
                stopped_on_eos=tracker.stopped_on_eos,
                seconds=seconds,
                first_token_seconds=first,
            )
        )
    return results


def generate_one(
    model: Any,
    tokenizer: Any,
    request: GenerationRequest,
    *,
    generate_kwargs: dict[str, Any] | None = None,
) -> Generation:
    return generate_batch(model, tokenizer, [request], generate_kwargs=generate_kwargs)[0]
