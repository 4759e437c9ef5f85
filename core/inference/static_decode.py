"""Single-stream decoding over a static KV cache, one token per replay of a CUDA graph.

``generate()`` with ``cache_implementation="static"`` and a compiled forward still runs its
whole Python loop (input preparation, logits processors, stopping criteria, mask updates) on
every token and waits for the GPU before the next one: on an 8B model that host work cost
more time than the GPU's own step. Here the prompt is prefilled once (eager), and each new
token is one call of a small step function, ``model(token, position) -> next token``,
compiled with ``mode="reduce-overhead"`` so that a token is one CUDA-graph replay. The host
copies each token back without blocking and launches the next step before it reads the
copy, so the GPU is never idle waiting for the host's text tracking and stop checks.

The loop is device-agnostic: on the CPU (``compile=False``) it runs eagerly, which is how the
tests check that it answers exactly like ``generate``.

The model may be a merged one or a peft model with one LoRA adapter applied (its active one,
not merged: the 4-bit path, where merging would round the adapter into the 4-bit weights). For
a peft model the loop calls the transformers model peft injected its LoRA layers into, not the
PeftModel wrapper, whose per-call adapter bookkeeping the graph need not trace.
"""

from __future__ import annotations

import time
from typing import Any

from core.data.tokenize import render
from core.errors import MedtuneError
from core.inference.generate import Generation, GenerationRequest, TextTracker


class StaticDecoder:
    """Greedy or sampled decoding of one request at a time through one static cache."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_cache_tokens: int,
        compile: bool,
        fullgraph: bool = True,
    ):
        import torch
        from transformers import StaticCache

        if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
            model = model.get_base_model()  # LoRA layers stay in it, the active adapter on
        self.model = model
        self.tokenizer = tokenizer
        self.max_cache_tokens = max_cache_tokens
        self.device = model.device
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_tokens)
        step = self._step
        # fullgraph: a graph break would split the step into pieces that each launch separately
        # (fullgraph=False still runs, each piece its own graph: the fallback for a model whose
        # step dynamo cannot trace whole).
        self._decode = (
            torch.compile(step, mode="reduce-overhead", fullgraph=fullgraph, dynamic=False)
            if compile
            else step
        )
        self._compiled = compile

    def _step(self, token: Any, position: Any) -> Any:
        """Logits of the next token after ``token`` (1 x 1) at cache ``position`` (1,)."""
        out = self.model(
            input_ids=token,
            cache_position=position,
            past_key_values=self.cache,
            use_cache=True,
            return_dict=False,
        )
        return out[0][:, -1, :]

    @staticmethod
    def _choose(
        logits: Any, temperature: float, top_p: float, penalty: float = 1.0, seen: Any = None
    ) -> Any:
        """The next token as a (1, 1) tensor on the device, without a host sync."""
        import torch

        if seen is not None:
            # transformers' repetition penalty: a seen token's logit is divided by the penalty
            # when positive, multiplied when negative; then the token joins the seen set.
            logits = torch.where(
                seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits
            )
        if temperature <= 0:
            return logits.argmax(dim=-1, keepdim=True)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest head of the distribution whose mass reaches top_p.
            drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        # Exponential race (as gpt-fast does): a multinomial draw with no device-to-host sync.
        race = probs / torch.empty_like(probs).exponential_(1)
        return race.argmax(dim=-1, keepdim=True)

    def generate(self, request: GenerationRequest) -> Generation:
        import torch

        text = render(
            self.tokenizer,
            request.messages,
            add_generation_prompt=True,
            chat_template=request.chat_template,
        )
        prompt = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        n = int(prompt.shape[1])
        if n + request.max_new_tokens > self.max_cache_tokens:
            raise MedtuneError(
                f"the prompt ({n} tokens) plus max_new_tokens ({request.max_new_tokens}) exceed "
                f"the fast path's cache of {self.max_cache_tokens} tokens",
                field="max_new_tokens",
                code="context_length_exceeded",
            )
        tracker = TextTracker(
            self.tokenizer,
            stop=tuple(request.stop),
            eos_token_id=None if request.ignore_eos else self.tokenizer.eos_token_id,
            max_new_tokens=request.max_new_tokens,
            on_delta=request.on_delta,
            should_stop=request.should_stop,
        )
        pinned = self.device.type == "cuda"
        host = torch.empty(1, dtype=torch.long, pin_memory=pinned)
        copied = torch.cuda.Event() if pinned else None
        started = time.perf_counter()
        first: float | None = None
        with torch.no_grad():
            self.cache.reset()
            logits = self.model(
                input_ids=prompt.to(self.device),
                cache_position=torch.arange(n, device=self.device),
                past_key_values=self.cache,
                use_cache=True,
                return_dict=False,
            )[0][:, -1, :]
            # A vocabulary-wide mask of the answer's tokens so far, kept on the device (no
            # sync); the prompt's are not penalised (see generate.answer_penalty).
            seen = None
            if request.repetition_penalty != 1.0:
                seen = torch.zeros_like(logits, dtype=torch.bool)
            choose_args = (request.temperature, request.top_p, request.repetition_penalty, seen)
            token = self._choose(logits, *choose_args)
            _mark(seen, token)
            position = torch.tensor([n], device=self.device)
            for made in range(1, request.max_new_tokens + 1):
                host.copy_(token.view(-1), non_blocking=pinned)
                if copied is not None:
                    copied.record()
                following = None
                if made < request.max_new_tokens:
                    # Launched before this token is read: the GPU works while the host tracks.
                    following = self._next(token, position, choose_args)
                if copied is not None:
                    copied.synchronize()
                tracker.add(int(host[0]))
                if first is None:
                    first = time.perf_counter() - started
                if tracker.done or following is None:
                    break
                token = following
                _mark(seen, token)
                position += 1
        tracker.finish("length")
        return Generation(
            text=tracker.answer,
            finish_reason=tracker.finish_reason or "length",
            prompt_tokens=n,
            completion_tokens=len(tracker.ids),
            stopped_on_eos=tracker.stopped_on_eos,
            seconds=time.perf_counter() - started,
            first_token_seconds=first,
            cancelled=tracker.cancelled,
        )

    def _next(self, token: Any, position: Any, choose_args: tuple[Any, ...]) -> Any:
        import torch

        if self._compiled:
            # Each call is a new step of the graph tree; the last step's outputs may be reused.
            torch.compiler.cudagraph_mark_step_begin()
        return self._choose(self._decode(token, position), *choose_args)


def _mark(seen: Any, token: Any) -> None:
    """Add the chosen (1, 1) token to the seen mask, on the device."""
    if seen is not None:
        seen.scatter_(1, token, True)
