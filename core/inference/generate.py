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
    # Above 1 lowers the logit of every token already in the answer (CTRL's penalty, on the
    # answer's tokens only: see answer_penalty); 1.0 is off. Greedy decoding of a small model
    # loops in long answers without it (issue #20).
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    adapter: str | None = None  # a loaded peft adapter's name; None answers with the base model
    on_delta: Callable[[str], None] | None = None  # called with each new piece of answer text
    # Asked every token: true once nobody waits for the answer any more (the API gave up).
    should_stop: Callable[[], bool] | None = None
    # Benchmarks only: decode all max_new_tokens even past the end of turn (random weights end
    # anywhere). The static decoder honours it; generate() takes min_new_tokens instead.
    ignore_eos: bool = False
    # The template the adapter was trained with (its saved tokenizer's), when it is not the
    # base tokenizer's own: a batch shares one base model but each row renders as it trained.
    chat_template: str | None = None

    def sampling_key(self) -> tuple[bool, float, float, float]:
        """Requests batch together only if generate() would sample them alike."""
        if self.temperature > 0:
            return (True, self.temperature, self.top_p, self.repetition_penalty)
        return (False, 0.0, 1.0, self.repetition_penalty)


@dataclass
class Generation:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int  # the end-of-turn token counts, as generate() produced it
    stopped_on_eos: bool
    seconds: float
    first_token_seconds: float | None
    cancelled: bool = False  # stopped by should_stop: the text is partial and nobody wants it
    token_ids: tuple[int, ...] = ()  # the answer's tokens, as counted (where the backend says)

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
    should_stop: Callable[[], bool] | None = None
    ids: list[int] = field(default_factory=list)
    sent: str = ""
    text: str = ""
    finish_reason: FinishReason | None = None
    stopped_on_eos: bool = False
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token_id: int) -> None:
        if self.done:
            return
        if self.should_stop is not None and self.should_stop():
            self.cancelled = True
            self.finish_reason = "length"  # ended early; the engine reports it cancelled
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
    """A StoppingCriteria: feeds each row's newest token to its tracker, stops finished rows,
    and ends the turn (every row at once) when ``pause`` says others wait for the model."""

    def __init__(self, trackers: list[TextTracker], started: float) -> None:
        self.trackers = trackers
        self.started = started
        self.first_token_at: float | None = None
        self.pause: Callable[[], bool] | None = None
        self.turn_tokens = 0
        self.made = 0  # tokens of this turn
        self.paused = False

    def begin_turn(self, pause: Callable[[], bool] | None, turn_tokens: int) -> None:
        self.pause, self.turn_tokens, self.made, self.paused = pause, turn_tokens, 0, False

    def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
        import torch

        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        newest = input_ids[:, -1].tolist()
        for tracker, token in zip(self.trackers, newest, strict=True):
            tracker.add(int(token))
        self.made += 1
        if self.pause is not None and self.made >= self.turn_tokens and self.pause():
            self.paused = True
            return torch.ones(len(self.trackers), dtype=torch.bool, device=input_ids.device)
        return torch.tensor([t.done for t in self.trackers], device=input_ids.device)


def answer_penalty(penalty: float, prompt_width: int) -> dict[str, Any]:
    """generate() kwargs for the repetition penalty on the answer's own tokens, not the prompt's.

    transformers penalises every token in ``input_ids``, the prompt's too: the question's words
    and, above all, the end-of-turn token each chat turn of the prompt ends with, so a penalty
    of 1.1 made both SmolLM2s stop on their own less often (BENCHMARKS.md, "Session 11"). Past
    ``prompt_width`` (the left-padded prompt) lie only the answers' tokens; llama.cpp's sampler
    likewise penalises only the tokens it sampled.
    """
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    answer_only = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=prompt_width)
    return {"repetition_penalty": 1.0, "logits_processor": LogitsProcessorList([answer_only])}


@dataclass
class Batch:
    """One left-padded batch being answered, turn by turn; between turns it keeps its tokens
    and its KV cache, so a turn resumes where the last one stopped and recomputes nothing."""

    model: Any
    tokenizer: Any
    requests: Sequence[GenerationRequest]
    inputs: dict[str, Any]
    prompt_tokens: list[int]
    stops: _RowStops
    generate_kwargs: dict[str, Any]
    prompt_width: int  # the padded prompt's tokens; past it, the answers'
    cache: Any = None
    seconds: float = 0.0  # spent generating, not waiting between turns

    @property
    def done(self) -> bool:
        return all(t.done for t in self.stops.trackers)


def start_batch(
    model: Any,
    tokenizer: Any,
    requests: Sequence[GenerationRequest],
    *,
    generate_kwargs: dict[str, Any] | None = None,
) -> Batch:
    """Render and tokenize ``requests`` (same sampling settings) as one left-padded batch."""
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
    trackers = [
        TextTracker(
            tokenizer,
            stop=tuple(r.stop),
            eos_token_id=tokenizer.eos_token_id,
            max_new_tokens=r.max_new_tokens,
            on_delta=r.on_delta,
            should_stop=r.should_stop,
        )
        for r in requests
    ]
    return Batch(
        model=model,
        tokenizer=tokenizer,
        requests=requests,
        inputs=dict(inputs),
        prompt_tokens=[int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()],
        stops=_RowStops(trackers, time.perf_counter()),
        generate_kwargs=dict(generate_kwargs or {}),
        prompt_width=int(inputs["input_ids"].shape[1]),
    )


def run_turn(
    batch: Batch, *, pause: Callable[[], bool] | None = None, turn_tokens: int = 16
) -> bool:
    """Generate until every row is done, or (with ``pause``) until ``pause()`` is true after
    ``turn_tokens`` tokens of this turn. Returns whether every row is done."""
    import torch
    from transformers import StoppingCriteriaList

    trackers = batch.stops.trackers
    left = [r.max_new_tokens - len(t.ids) for r, t in zip(batch.requests, trackers, strict=True)]
    left = [n for n, t in zip(left, trackers, strict=True) if not t.done]
    if not left:
        return True
    do_sample, temperature, top_p, penalty = batch.requests[0].sampling_key()
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if do_sample
        else {"do_sample": False}
    )
    if penalty != 1.0:
        sampling.update(answer_penalty(penalty, batch.prompt_width))
    eos = batch.tokenizer.eos_token_id
    pad = batch.tokenizer.pad_token_id
    # Set again each turn: another batch may have switched the model's adapter meanwhile.
    context, extra = _adapter_context(batch.model, batch.requests)
    batch.stops.begin_turn(pause, turn_tokens)
    resumable = {"return_dict_in_generate": True} if pause is not None else {}
    if batch.cache is not None:
        resumable["past_key_values"] = batch.cache
    began = time.perf_counter()
    with torch.inference_mode(), context:
        out = batch.model.generate(
            **batch.inputs,
            max_new_tokens=max(left),
            eos_token_id=eos,
            pad_token_id=pad if pad is not None else eos,
            stopping_criteria=StoppingCriteriaList([batch.stops]),
            **sampling,
            **extra,
            **resumable,
            **batch.generate_kwargs,
        )
    batch.seconds += time.perf_counter() - began
    if not batch.stops.paused or batch.done:
        return True
    # The next turn starts from every token so far; the cache holds all but the newest.
    ids, mask = out.sequences, batch.inputs["attention_mask"]
    grown = torch.ones(ids.shape[0], ids.shape[1] - mask.shape[1], dtype=mask.dtype)
    batch.inputs = {"input_ids": ids, "attention_mask": torch.cat([mask, grown.to(mask.device)], 1)}
    batch.cache = out.past_key_values
    return False


def batch_results(batch: Batch) -> list[Generation]:
    stops = batch.stops
    first = stops.first_token_at - stops.started if stops.first_token_at is not None else None
    results = []
    for tracker, prompt in zip(stops.trackers, batch.prompt_tokens, strict=True):
        tracker.finish("length")  # a row generate() ended without our trackers deciding
        results.append(
            Generation(
                text=tracker.answer,
                finish_reason=tracker.finish_reason or "length",
                prompt_tokens=prompt,
                completion_tokens=len(tracker.ids),
                stopped_on_eos=tracker.stopped_on_eos,
                seconds=batch.seconds,
                first_token_seconds=first,
                cancelled=tracker.cancelled,
                token_ids=tuple(tracker.ids),
            )
        )
    return results


def generate_batch(
    model: Any,
    tokenizer: Any,
    requests: Sequence[GenerationRequest],
    *,
    generate_kwargs: dict[str, Any] | None = None,
) -> list[Generation]:
    """Answer ``requests`` (same sampling settings) with one left-padded ``generate`` call."""
    batch = start_batch(model, tokenizer, requests, generate_kwargs=generate_kwargs)
    run_turn(batch)
    return batch_results(batch)


def generate_one(
    model: Any,
    tokenizer: Any,
    request: GenerationRequest,
    *,
    generate_kwargs: dict[str, Any] | None = None,
) -> Generation:
    return generate_batch(model, tokenizer, [request], generate_kwargs=generate_kwargs)[0]
