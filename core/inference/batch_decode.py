"""Several requests decoded together over one static KV cache, each row its own LoRA adapter.

The batched counterpart of core/inference/static_decode.py: the model carries batched LoRA
layers (core/inference/multi_lora.py), the cache has ``rows`` rows, and every step is one call
of ``model(tokens [rows, 1], position) -> next tokens`` of a fixed shape, so compiled with
``mode="reduce-overhead"`` it is one CUDA-graph replay whatever the batch holds: a batch of
fewer requests leaves rows idle (they repeat the first prompt on the base, and their tokens are
dropped). Prompts are left-padded to the longest one and prefilled together; each row keeps its
own positions (``position_ids``) and an attention mask that hides its padding, so a row answers
as it would alone. Rows stop on their own (end of turn, stops, their ``max_new_tokens``); the
batch ends when every row has.

All requests of a batch share their sampling settings (``GenerationRequest.sampling_key``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from core.data.tokenize import render
from core.errors import MedtuneError
from core.inference.generate import Generation, GenerationRequest, TextTracker
from core.inference.multi_lora import LoraSlots
from core.inference.static_decode import StaticDecoder


class BatchDecoder:
    """Decodes up to ``rows`` requests at once, row b through the adapter its request names."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        slots: LoraSlots,
        *,
        rows: int,
        max_cache_tokens: int,
        compile: bool,
        fullgraph: bool = True,
    ) -> None:
        import torch
        from transformers import StaticCache

        self.model = model
        self.tokenizer = tokenizer
        self.slots = slots
        self.rows = rows
        self.max_cache_tokens = max_cache_tokens
        self.device = model.device
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_tokens)
        # Row b attends to the cache slots its mask holds: all but its left padding.
        self.mask = torch.ones(rows, max_cache_tokens, dtype=torch.long, device=self.device)
        self._decode = (
            torch.compile(self._step, mode="reduce-overhead", fullgraph=fullgraph, dynamic=False)
            if compile
            else self._step
        )
        self._compiled = compile

    def _step(self, tokens: Any, position: Any, positions: Any) -> Any:
        """Logits [rows, vocab] after ``tokens`` [rows, 1] at cache slot ``position`` (1,),
        each row at its own ``positions`` [rows, 1] (the slot less its padding)."""
        out = self.model(
            input_ids=tokens,
            cache_position=position,
            position_ids=positions,
            attention_mask=self.mask,
            past_key_values=self.cache,
            use_cache=True,
            return_dict=False,
        )
        return out[0][:, -1, :]

    def _prompt(self, request: GenerationRequest) -> list[int]:
        text = render(
            self.tokenizer,
            request.messages,
            add_generation_prompt=True,
            chat_template=request.chat_template,
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def fits(self, request: GenerationRequest) -> bool:
        """Whether the request's prompt and answer fit a row of the cache."""
        return len(self._prompt(request)) + request.max_new_tokens <= self.max_cache_tokens

    def _prompts(self, requests: Sequence[GenerationRequest]) -> list[list[int]]:
        prompts = [self._prompt(request) for request in requests]
        longest = max(len(p) for p in prompts)
        most = max(r.max_new_tokens for r in requests)
        if longest + most > self.max_cache_tokens:
            raise MedtuneError(
                f"the prompt ({longest} tokens) plus max_new_tokens ({most}) exceed the fast "
                f"path's cache of {self.max_cache_tokens} tokens",
                field="max_new_tokens",
                code="context_length_exceeded",
            )
        return prompts

    def generate(
        self, requests: Sequence[GenerationRequest], adapters: Sequence[str | None]
    ) -> list[Generation]:
        """Answer ``requests`` (at most ``rows``, one sampling setting) in one batch; row b with
        the adapter folder ``adapters[b]`` (None: the base)."""
        if not 0 < len(requests) <= self.rows:
            raise ValueError(f"a batch holds 1 to {self.rows} requests, not {len(requests)}")
        if len({r.sampling_key() for r in requests}) != 1:
            raise ValueError("a batch must share its sampling settings; group requests first")
        prompts = self._prompts(requests)
        in_use = {a for a in adapters if a}
        self.slots.set_rows([self.slots.slot(a, in_use=in_use) if a else None for a in adapters])
        trackers = [
            TextTracker(
                self.tokenizer,
                stop=tuple(r.stop),
                eos_token_id=None if r.ignore_eos else self.tokenizer.eos_token_id,
                max_new_tokens=r.max_new_tokens,
                on_delta=r.on_delta,
                should_stop=r.should_stop,
            )
            for r in requests
        ]
        started = time.perf_counter()
        first = self._run(requests, prompts, trackers)
        seconds = time.perf_counter() - started
        results = []
        for tracker, prompt in zip(trackers, prompts, strict=True):
            tracker.finish("length")
            results.append(
                Generation(
                    text=tracker.answer,
                    finish_reason=tracker.finish_reason or "length",
                    prompt_tokens=len(prompt),
                    completion_tokens=len(tracker.ids),
                    stopped_on_eos=tracker.stopped_on_eos,
                    seconds=seconds,
                    first_token_seconds=None if first is None else first - started,
                    cancelled=tracker.cancelled,
                )
            )
        return results

    def _prefill(self, prompts: list[list[int]]) -> tuple[Any, Any, int]:
        """Left-padded prompts through the model: the last logits [rows, vocab], each row's
        padding [rows, 1] and the padded length. Idle rows repeat the first prompt."""
        import torch

        padded = max(len(p) for p in prompts)
        rows = prompts + [prompts[0]] * (self.rows - len(prompts))
        pad_id = self.tokenizer.pad_token_id
        pad_id = self.tokenizer.eos_token_id if pad_id is None else pad_id
        ids = torch.tensor([[pad_id] * (padded - len(p)) + p for p in rows], device=self.device)
        pads = torch.tensor([[padded - len(p)] for p in rows], device=self.device)
        self.mask.fill_(1)
        for b, p in enumerate(rows):
            self.mask[b, : padded - len(p)] = 0
        positions = (torch.arange(padded, device=self.device)[None, :] - pads).clamp(min=0)
        logits = self.model(
            input_ids=ids,
            cache_position=torch.arange(padded, device=self.device),
            position_ids=positions,
            attention_mask=self.mask,
            past_key_values=self.cache,
            use_cache=True,
            return_dict=False,
        )[0][:, -1, :]
        return logits, pads, padded

    def _run(
        self,
        requests: Sequence[GenerationRequest],
        prompts: list[list[int]],
        trackers: list[TextTracker],
    ) -> float | None:
        """Prefill, then one step per token until every row is done; returns when the first
        token was read."""
        import torch

        first = requests[0]
        pinned = self.device.type == "cuda"
        host = torch.empty(self.rows, dtype=torch.long, pin_memory=pinned)
        copied = torch.cuda.Event() if pinned else None
        most = max(r.max_new_tokens for r in requests)
        first_at: float | None = None
        with torch.no_grad():
            self.cache.reset()
            logits, pads, padded = self._prefill(prompts)
            seen = None  # the answers' tokens so far, not the prompts' (generate.answer_penalty)
            if first.repetition_penalty != 1.0:
                seen = torch.zeros_like(logits, dtype=torch.bool)
            args = (first.temperature, first.top_p, first.repetition_penalty, seen)
            token = StaticDecoder._choose(logits, *args)
            _mark(seen, token)
            position = torch.tensor([padded], device=self.device)
            positions = position[None, :] - pads
            for made in range(1, most + 1):
                host.copy_(token.view(-1), non_blocking=pinned)
                if copied is not None:
                    copied.record()
                following = None
                if made < most:  # launched before this token is read
                    following = self._next(token, position, positions, args)
                if copied is not None:
                    copied.synchronize()
                for b, tracker in enumerate(trackers):
                    tracker.add(int(host[b]))
                first_at = first_at or time.perf_counter()
                if following is None or all(t.done for t in trackers):
                    break
                token = following
                _mark(seen, token)
                position += 1
                positions += 1
        return first_at

    def _next(self, token: Any, position: Any, positions: Any, args: tuple[Any, ...]) -> Any:
        import torch

        if self._compiled:
            torch.compiler.cudagraph_mark_step_begin()
        return StaticDecoder._choose(self._decode(token, position, positions), *args)


def _mark(seen: Any, token: Any) -> None:
    if seen is not None:
        seen.scatter_(1, token, True)
