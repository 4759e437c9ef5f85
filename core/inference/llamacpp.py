"""The CPU fast path: answer from a GGUF file with llama.cpp (llama-cpp-python).

The prompt is rendered with the model's own Hugging Face chat template (the one it was trained
with) and tokenized by llama.cpp with special tokens parsed, so both backends see the same
tokens. Decoding goes token by token through ``Llama.generate`` (which reuses the KV cache of
the longest shared prompt prefix, e.g. the system prompt) and through the same ``TextTracker``
as the transformers backend: same stop rules, same deltas, same answer shape.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

from core.data.tokenize import render
from core.errors import MedtuneError
from core.inference.context import LLAMA_MAX_CTX, check_fits, gguf_context
from core.inference.generate import Generation, GenerationRequest, TextTracker
from core.settings import default_llama_threads, usable_cpus


class LlamaCppUnavailable(MedtuneError):
    code = "backend_unavailable"
    status = 409


class GgufInvalid(MedtuneError):
    code = "gguf_invalid"
    status = 409


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class _LlamaText:
    """The two tokenizer calls ``TextTracker`` makes, answered by llama.cpp's vocabulary."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = self.llm.detokenize(ids, special=not skip_special_tokens)
        return bytes(data).decode("utf-8", errors="replace")


class LlamaCppBackend:
    """GGUF models kept loaded (an LRU of ``max_models``), answering one request at a time."""

    def __init__(
        self,
        *,
        loads: Counter[str],
        max_models: int = 2,
        max_ctx: int = LLAMA_MAX_CTX,
        n_threads: int | None = None,
    ) -> None:
        self.loads = loads
        self.max_models = max_models
        self.max_ctx = max_ctx
        self._contexts: dict[str, int] = {}
        self._contexts_lock = threading.Lock()  # asked from the request threads
        # No count given: half the usable CPUs, as for a process that may share the machine
        # (API, training): llama.cpp's spinning threads collapse when the cores are
        # oversubscribed (on the 2-core machine under load: 2 threads 0.96 tokens/s, 1 thread
        # 17). An inference-only worker passes all of them (Settings.llama_threads).
        self.n_threads = n_threads or default_llama_threads(
            inference_only=False, cpus=usable_cpus()
        )
        self._models: OrderedDict[str, Any] = OrderedDict()

    def context_length(self, gguf: str) -> int:
        """The context a model is loaded with: the one it trained with (its GGUF says), up to
        ``max_ctx``. A fixed 4,096 made every max_new_tokens of 4,096 fail."""
        with self._contexts_lock:
            if gguf not in self._contexts:
                if not Path(gguf).is_file():
                    raise GgufInvalid(
                        f"the GGUF file {Path(gguf).name} is missing", field="backend"
                    )
                trained = gguf_context(gguf) or 4096  # a GGUF without the key: llama.cpp's own
                self._contexts[gguf] = min(trained, self.max_ctx)
            return self._contexts[gguf]

    def _model(self, gguf: str) -> Any:
        if gguf in self._models:
            self._models.move_to_end(gguf)
            return self._models[gguf]
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise LlamaCppUnavailable(
                "the llama.cpp backend needs llama-cpp-python on the inference worker; "
                "install it or ask with backend 'transformers'",
                field="backend",
            ) from exc
        if not Path(gguf).is_file():
            raise GgufInvalid(f"the GGUF file {Path(gguf).name} is missing", field="backend")
        try:
            llm = Llama(
                model_path=gguf,
                n_ctx=self.context_length(gguf),
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                n_batch=512,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise GgufInvalid(
                f"llama.cpp could not load {Path(gguf).name}: {str(exc)[:200]}", field="backend"
            ) from exc
        self.loads["gguf"] += 1
        self._models[gguf] = llm
        if len(self._models) > self.max_models:
            self._models.popitem(last=False)
        return llm

    def _end_ids(self, llm: Any, tokenizer: Any) -> set[int]:
        """llama.cpp's end-of-generation id, and the chat template's end of turn."""
        ends = {int(llm.token_eos())}
        if tokenizer.eos_token:
            ids = llm.tokenize(tokenizer.eos_token.encode(), add_bos=False, special=True)
            if len(ids) == 1:
                ends.add(int(ids[0]))
        return ends

    def generate(self, gguf: str, tokenizer: Any, request: GenerationRequest) -> Generation:
        llm = self._model(gguf)
        text = render(tokenizer, request.messages, add_generation_prompt=True)
        # The ids transformers makes, the ones the model trained on: the GGUF's vocabulary is
        # the tokenizer's, id for id, but llama.cpp's own SentencePiece tokenizer adds a space
        # after each special token of a Mistral chat ("[INST]", "<s>").
        prompt = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        # The engine checked already; this guards a caller that goes straight here.
        check_fits(
            prompt_tokens=len(prompt),
            max_new_tokens=request.max_new_tokens,
            context=int(llm.n_ctx()),
            what="the llama.cpp context",
        )
        ends = self._end_ids(llm, tokenizer)
        tracker = TextTracker(
            _LlamaText(llm),
            stop=tuple(request.stop),
            eos_token_id=None,  # end ids are handled below: llama.cpp may have two
            max_new_tokens=request.max_new_tokens,
            on_delta=request.on_delta,
            should_stop=request.should_stop,
        )
        sample = request.temperature > 0
        started = time.perf_counter()
        first: float | None = None
        stopped_on_eos = False
        for token in llm.generate(
            prompt,
            temp=request.temperature if sample else 0.0,
            top_p=request.top_p if sample else 1.0,
            top_k=0,
            min_p=0.0,
            # llama.cpp's sampler penalises the last 64 tokens it sampled (its default window):
            # the answer's, as generate.answer_penalty does, not the prompt's.
            repeat_penalty=request.repetition_penalty,
        ):
            if first is None:
                first = time.perf_counter() - started
            if token in ends:
                tracker.ids.append(int(token))
                stopped_on_eos = True
                tracker.finish("stop")
                break
            tracker.add(int(token))
            if tracker.done:
                break
        tracker.finish("length")
        seconds = time.perf_counter() - started
        return Generation(
            text=tracker.answer,
            finish_reason=tracker.finish_reason or "length",
            prompt_tokens=len(prompt),
            completion_tokens=len(tracker.ids),
            stopped_on_eos=stopped_on_eos,
            seconds=seconds,
            first_token_seconds=first,
            cancelled=tracker.cancelled,
        )
