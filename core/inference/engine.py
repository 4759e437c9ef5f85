"""Answer questions with a base model and, optionally, a job's LoRA adapter.

One long-lived engine per inference process keeps each base model loaded once and an LRU of
adapters attached to it (peft multi-adapter), so a second question to a job reloads nothing
(``loads`` counts every load). Requests from any thread go through a ``Batcher``: those that
arrive within a few milliseconds for the same base model and sampling settings are answered by
one left-padded ``generate`` call, adapters mixed per row.

Backends, chosen per request (``backend``) or automatically:
- ``transformers``: the base model in float32 on the CPU; on CUDA through ``core.inference.cuda``
  (Unsloth ``for_inference`` for adapters).
- ``llama_cpp``: a GGUF file through llama.cpp: a job's ``gguf/model-q4_k_m.gguf`` export, or the
  embedded model's shipped GGUF for its base. ``auto`` picks it on a CPU when the file exists.
- ``cuda_static``: on CUDA, a static KV cache and one CUDA-graph replay per token: a job's
  ``merged_16bit`` export, or the fast model the engine builds itself in the background for an
  adapter it was asked about (core/inference/fast.py); ``auto`` picks it once it is ready.
  Once two adapters of one base were asked, that base's multi-LoRA model serves every adapter
  that fits its slots (core/inference/fast_multi.py): requests to different adapters that
  arrive within the batch window share one batch there (a lone request takes its adapter's
  own fast model when one is ready). A fast build starts only after the adapter's first answer
  and once the model thread is idle, so a new job's first answer never waits behind it.

``warm`` loads a base (and an adapter) before anyone asks: the training worker sends it when a
job starts training and when its adapter is saved (core/inference/warm.py).

Three lanes, so one slow request cannot hold the others: llama.cpp has a thread of its own, so
do the CUDA-graph models (built, recorded and replayed on one thread: core/inference/fast.py),
and the model thread answers in turns. A transformers batch that has made ``TURN_TOKENS`` tokens
while a new request waits ends its turn and is requeued behind it, keeping its tokens and KV
cache: a short question waits at most one turn (plus the prefill of the batch in progress) for
a long generation. Turns are CPU-only: on CUDA generation is fast and Unsloth's generate is not
known to resume from a cache.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.base_models import hub_call, resolve
from core.data.tokenize import ensure_chat_template, saved_chat_template
from core.errors import MedtuneError
from core.inference.adapters import activate
from core.inference.batching import Batcher, InferenceCancelled, Pending, chain, settle
from core.inference.context import PromptCounter, check_fits
from core.inference.fast import FastPaths
from core.inference.fast_multi import answer_batch
from core.inference.generate import (
    Batch,
    GenerationRequest,
    batch_results,
    run_turn,
    start_batch,
)
from core.inference.llamacpp import LlamaCppBackend, LlamaCppUnavailable, llama_cpp_available
from core.inference.request import InferenceRequest

log = logging.getLogger(__name__)

Backend = Literal["auto", "transformers", "llama_cpp"]
BACKENDS: tuple[str, ...] = ("auto", "transformers", "llama_cpp")
TURN_TOKENS = 16  # tokens a batch makes before it may yield the model to a waiting request


@dataclass
class _Base:
    model: Any  # a PeftModel once an adapter is attached
    tokenizer: Any
    adapters: OrderedDict[str, str]  # adapter name -> its folder, least recently used first
    # The CUDA-graph lane's own copy: the model thread sets padding on ``tokenizer`` per batch,
    # and a Rust tokenizer used from two threads at once raises "Already borrowed".
    lane_tokenizer: Any = None


@dataclass(eq=False)
class _Call:
    """Work for the model thread between batches (a warm load, installing a fast model)."""

    fn: Callable[[], Any]


@dataclass(eq=False)
class _Paused:
    """A transformers batch between two turns: its requests, their adapters, and its state."""

    base: _Base
    batch: Batch
    pending: list[Pending]
    adapters: set[str | None]


class InferenceEngine:
    def __init__(
        self,
        *,
        models_dir: Path,
        max_adapters: int = 8,
        max_batch: int = 8,
        batch_wait_s: float = 0.005,
        default_backend: str = "auto",
        llama_threads: int | None = None,
        fast: bool = True,
    ) -> None:
        self.models_dir = models_dir
        self.max_adapters = max(max_adapters, max_batch)  # a batch's adapters fit at once
        self.default_backend = default_backend
        self.loads: Counter[str] = Counter()  # how often a base, adapter or GGUF was loaded
        self._bases: dict[tuple[str, bool], _Base] = {}
        self._tokenizers: dict[str, Any] = {}
        self._llama_tokenizers: dict[str, Any] = {}  # the llama.cpp lane's own
        self._paused: set[_Paused] = set()
        self.llama = LlamaCppBackend(loads=self.loads, n_threads=llama_threads)
        self.counter = PromptCounter()
        self._cuda: bool | None = None
        self.batcher = Batcher(
            self._run_group,
            self._group_key,
            max_batch=max_batch,
            wait_s=batch_wait_s,
            batchable=lambda request: getattr(request, "backend", None) == "transformers",
        )
        # CUDA-graph trees keep their state per thread: one thread compiles, records and
        # replays every fast model (and builds them, while the model thread answers). Requests
        # to the multi-LoRA model wait out the batch window there: different adapters batch.
        self.fast_lane = Batcher(
            self._run_group,
            self._group_key,
            max_batch=max_batch,
            wait_s=batch_wait_s,
            name="medtune-cuda-static",
            batchable=lambda request: getattr(request, "backend", None) == "cuda_multi",
        )
        self.fast = FastPaths(
            run_on_lane=lambda fn: self.fast_lane.submit(_Call(fn)),
            loads=self.loads,
            enabled=fast,
            rows=max_batch,
            idle=self.batcher.idle,  # a build starts once the model thread has answered
        )
        self.llama_lane = Batcher(
            self._run_group,
            self._group_key,
            max_batch=1,
            wait_s=0.0,
            name="medtune-llama-cpp",
            batchable=lambda request: False,
        )

    # --- public -------------------------------------------------------------------------------

    def submit(self, request: InferenceRequest) -> Future[dict[str, Any]]:
        """Queue a request; the Future holds the answer dict or raises a MedtuneError."""
        request.backend = self.choose_backend(request)
        self.check_context(request)
        lanes = {
            "llama_cpp": self.llama_lane,
            "cuda_static": self.fast_lane,
            "cuda_multi": self.fast_lane,
        }
        lane = lanes.get(request.backend, self.batcher)
        return lane.submit(request)

    def answer(self, **kwargs: Any) -> dict[str, Any]:
        return self.submit(InferenceRequest(**kwargs)).result()

    def warm(
        self,
        base_model: str,
        *,
        load_in_4bit: bool = True,
        adapter_dir: str | None = None,
        adapter_name: str | None = None,
    ) -> Future[dict[str, Any]]:
        """Load a base (and attach an adapter) on the model thread before anyone asks; on CUDA
        also run two tokens through it (kernels, autotuning). The adapter's fast path starts
        after its first answer. The Future holds what was done (``loads``)."""

        def load() -> dict[str, Any]:
            base = self._base(base_model, load_in_4bit=load_in_4bit)
            name = None
            if adapter_dir:
                name = adapter_name or adapter_dir
                self._activate(base, adapter_dir, name, in_use={name})
            if self.cuda:
                hi = [{"role": "user", "content": "Hi"}]
                gen = GenerationRequest(messages=hi, max_new_tokens=2, adapter=name)
                run_turn(start_batch(base.model, base.tokenizer, [gen]))
            # No fast build yet: it would compete with the job's first answer for the card
            # (and the CPU); it starts once that answer is out (``_turn``).
            return {"loads": dict(self.loads), "fast_build_started": False}

        return self.batcher.submit(_Call(load))

    def has_base(self, name: str, *, load_in_4bit: bool) -> bool:
        path = resolve(name, models_dir=self.models_dir)
        return (path, load_in_4bit and self.cuda) in self._bases

    @property
    def _unsloth(self) -> bool:
        if not self.cuda:
            return False
        from core.inference.cuda import unsloth_available

        return unsloth_available()

    @property
    def cuda(self) -> bool:
        if self._cuda is None:
            import torch

            self._cuda = bool(torch.cuda.is_available())
        return self._cuda

    def choose_backend(self, request: InferenceRequest) -> str:
        wanted = request.backend if request.backend != "auto" else self.default_backend
        if wanted not in BACKENDS:
            raise MedtuneError(
                f"backend must be one of {', '.join(BACKENDS)}", field="backend", code="bad_backend"
            )
        if wanted == "llama_cpp":
            if not request.gguf_path:
                raise LlamaCppUnavailable(
                    "no q4_k_m GGUF export for this model: export the job with format 'gguf' "
                    "(quantization q4_k_m), or ask with backend 'transformers'",
                    field="backend",
                )
            if not llama_cpp_available():
                raise LlamaCppUnavailable(
                    "llama-cpp-python is not installed on the inference worker; ask with "
                    "backend 'transformers'",
                    field="backend",
                )
            return "llama_cpp"
        if wanted == "auto":
            # While the lane builds a fast model (a minute), answers come from the model thread.
            if self.cuda and not self.fast.busy:
                if request.merged_dir:
                    return "cuda_static"
                base = resolve_base(request, self.models_dir)
                if self.fast.serves(base, request.adapter_dir):
                    return "cuda_multi"  # batched with other adapters' requests
                if self.fast.get(request.adapter_dir):
                    return "cuda_static"
            if not self.cuda and request.gguf_path and llama_cpp_available():
                return "llama_cpp"
        return "transformers"

    def check_context(self, request: InferenceRequest) -> None:
        """Refuse, in the caller's thread, a request longer than its backend's context."""
        base = resolve_base(request, self.models_dir)
        # The template the backend renders with: the adapter's own when it saved one.
        template = saved_chat_template(Path(request.adapter_dir)) if request.adapter_dir else None
        prompt = self.counter.count(base, request.messages, template)
        if request.backend == "llama_cpp":
            assert request.gguf_path
            context, what = self.llama.context_length(request.gguf_path), "the llama.cpp context"
        else:
            model = request.merged_dir if request.backend == "cuda_static" else None
            model = model or base
            assert model
            context, what = self.counter.model_context(model), "the model's context"
        if context is not None:  # a config that declares none: generate() is the judge
            check_fits(
                prompt_tokens=prompt,
                max_new_tokens=request.max_new_tokens,
                context=context,
                what=what,
            )

    # --- batching -----------------------------------------------------------------------------

    def _group_key(self, request: InferenceRequest | _Paused | _Call) -> Hashable:
        if isinstance(request, _Paused | _Call):
            return ("turn", id(request))
        if request.backend == "transformers":
            sampling = request.generation(None).sampling_key()
            # Unsloth's fast LoRA kernels serve one adapter at a time: no mixed batches there.
            adapter = request.adapter_dir if self._unsloth else None
            return ("transformers", request.base_model, request.load_in_4bit, sampling, adapter)
        if request.backend == "cuda_multi":
            return ("cuda_multi", request.base_model, request.generation(None).sampling_key())
        return (request.backend, id(request))  # llama.cpp and static graphs: one at a time

    def _run_group(self, group: Sequence[Pending]) -> None:
        if isinstance(group[0].request, _Paused):
            self._turn(group[0].request)
            return
        if isinstance(group[0].request, _Call):
            try:
                group[0].future.set_result(group[0].request.fn())
            except Exception as exc:
                group[0].future.set_exception(exc)
            return
        live = []
        for pending in group:
            if pending.request.cancelled():  # the API gave up while it waited here
                pending.future.set_exception(InferenceCancelled("dropped before it started"))
                continue
            if pending.request.on_start is not None:
                pending.request.on_start()
            live.append(pending)
        if not live:
            return
        group = live
        first: InferenceRequest = group[0].request
        if first.backend == "llama_cpp":
            self._run_llama(group[0])
        elif first.backend == "cuda_static":
            self._run_static(group[0])
        elif first.backend == "cuda_multi":
            self._run_multi(group)
        else:
            self._run_transformers(group)

    def _run_transformers(self, group: Sequence[Pending]) -> None:
        first: InferenceRequest = group[0].request
        try:
            base = self._base(first.base_model, load_in_4bit=first.load_in_4bit)
        except MedtuneError as exc:
            for pending in group:
                pending.future.set_exception(exc)
            return
        in_use = {p.request.adapter_name or p.request.adapter_dir for p in group}
        for paused in self._paused:  # a paused batch's adapters stay until it ends
            in_use |= paused.adapters
        ready: list[tuple[Pending, str | None]] = []
        for pending in group:
            req: InferenceRequest = pending.request
            try:
                name = None
                if req.adapter_dir:
                    name = req.adapter_name or req.adapter_dir
                    self._activate(base, req.adapter_dir, name, in_use=in_use)
                ready.append((pending, name))
            except MedtuneError as exc:
                pending.future.set_exception(exc)
        if not ready:
            return
        batch = start_batch(
            base.model,
            base.tokenizer,
            [self._generation(p.request, name, base.tokenizer) for p, name in ready],
        )
        self._turn(_Paused(base, batch, [p for p, _ in ready], {name for _, name in ready}))

    def _turn(self, paused: _Paused) -> None:
        """One turn of a batch: to its end, or until a new request waits (CPU only)."""
        self._paused.discard(paused)
        paused.batch.model = paused.base.model  # peft may have wrapped it since the last turn
        try:
            done = run_turn(
                paused.batch,
                pause=None if self.cuda else self.batcher.waiting,
                turn_tokens=TURN_TOKENS,
            )
        except BaseException as exc:
            for pending in paused.pending:
                pending.future.set_exception(exc)
            raise
        if not done:
            self._paused.add(paused)
            self.batcher.requeue(paused)
            return
        gens = batch_results(paused.batch)
        # Answered (every delta sent): queue the adapters' fast models before the callers hear.
        for req in {p.request.adapter_dir: p.request for p in paused.pending}.values():
            try:
                self._want_fast(req.base_model, paused.base, req.adapter_dir)
            except Exception:
                log.exception("fast path for %s not queued", req.adapter_dir)
        for pending, gen in zip(paused.pending, gens, strict=True):
            settle(pending, gen, backend="transformers", batch_size=len(gens))

    def _run_llama(self, pending: Pending) -> None:
        req: InferenceRequest = pending.request
        try:
            assert req.gguf_path
            tokenizer = self._tokenizer(
                req.adapter_dir or resolve_base(req, self.models_dir), self._llama_tokenizers
            )
            gen = self.llama.generate(req.gguf_path, tokenizer, req.generation(None))
        except MedtuneError as exc:
            pending.future.set_exception(exc)
            return
        settle(pending, gen, backend="llama_cpp", batch_size=1)

    def _run_static(self, pending: Pending) -> None:
        req: InferenceRequest = pending.request
        try:
            fast = self.fast.export(req.merged_dir) if req.merged_dir else None
            fast = fast or self.fast.get(req.adapter_dir)
            if fast is None:  # evicted since it was chosen: the model thread answers
                req.backend = "transformers"
                chain(self.batcher.submit(req), pending.future)
                return
            tokenizer = fast.decoder.tokenizer
            gen = fast.generate(self._generation(req, None, tokenizer))
        except MedtuneError as exc:  # a prompt too long for the static cache
            pending.future.set_exception(exc)
            return
        settle(pending, gen, backend="cuda_static", batch_size=1, fast_path=fast.kind)

    def _run_multi(self, group: Sequence[Pending]) -> None:
        """Requests to adapters of one base, in batches of the multi-LoRA model's rows."""
        first: InferenceRequest = group[0].request
        multi = self.fast.multi(resolve_base(first, self.models_dir))
        own = self.fast.get(first.adapter_dir) if len(group) == 1 else None
        if own is not None:  # alone: the adapter's own fast model (merged) is the faster one
            first.backend = "cuda_static"
            self._run_static(group[0])
            return
        if multi is None:
            self._to_model_thread(group)
            return
        answer_batch(
            multi,
            group,
            generation=lambda req: self._generation(req, None, multi.decoder.tokenizer),
            fall_back=self._to_model_thread,
        )

    def _to_model_thread(self, group: Sequence[Pending]) -> None:
        for pending in group:
            pending.request.backend = "transformers"
            chain(self.batcher.submit(pending.request), pending.future)

    def _want_fast(self, base_model: str, base: _Base, adapter_dir: str | None) -> bool:
        """Start the adapter's fast model in the background (CUDA; MEDTUNE_INFER_FAST)."""
        if not self.cuda or not adapter_dir:
            return False
        path = resolve(base_model, models_dir=self.models_dir)
        if base.lane_tokenizer is None:
            base.lane_tokenizer = copy.deepcopy(base.tokenizer)
        return self.fast.want(path, adapter_dir, base.lane_tokenizer)

    def _generation(
        self, req: InferenceRequest, adapter: str | None, base: Any
    ) -> GenerationRequest:
        """The request as generate_batch takes it, in the chat template its adapter trained on."""
        gen = req.generation(adapter)
        if req.adapter_dir:
            template = saved_chat_template(Path(req.adapter_dir))
            if template and template != base.chat_template:
                gen.chat_template = template
        return gen

    # --- models -------------------------------------------------------------------------------

    def _tokenizer(self, path: str, cache: dict[str, Any] | None = None) -> Any:
        """A tokenizer from ``cache`` (each lane has its own: one thread uses each)."""
        cache = self._tokenizers if cache is None else cache
        if path not in cache:
            from transformers import AutoTokenizer

            tokenizer = hub_call(path, AutoTokenizer.from_pretrained, path)
            ensure_chat_template(tokenizer)
            cache[path] = tokenizer
        return cache[path]

    def _base(self, name: str, *, load_in_4bit: bool) -> _Base:
        path = resolve(name, models_dir=self.models_dir)
        key = (path, load_in_4bit and self.cuda)
        if key not in self._bases:
            if self.cuda:
                from core.inference.cuda import load_base

                model, tokenizer = hub_call(name, load_base, path, load_in_4bit=key[1])
            else:
                import torch
                from transformers import AutoModelForCausalLM

                tokenizer = self._tokenizer(path)
                model = hub_call(
                    name, AutoModelForCausalLM.from_pretrained, path, dtype=torch.float32
                ).eval()
            ensure_chat_template(tokenizer)
            self._bases[key] = _Base(model, tokenizer, OrderedDict())
            self.loads["base"] += 1
        return self._bases[key]

    def _activate(self, base: _Base, adapter_dir: str, name: str, *, in_use: set[Any]) -> None:
        activate(
            base,
            adapter_dir,
            name,
            in_use=in_use,
            cuda=self.cuda,
            max_adapters=self.max_adapters,
            loads=self.loads,
        )


def resolve_base(request: InferenceRequest, models_dir: Path) -> str:
    return resolve(request.base_model, models_dir=models_dir)
