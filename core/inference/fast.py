"""The CUDA-graph path for a job's adapter, built by the inference worker itself (issue #14).

A tuned adapter answers first through Unsloth's ``for_inference`` (the base loaded once, LoRA
unmerged). Meanwhile, when the card has room, a background thread builds a faster model for
that adapter and the engine switches the adapter's requests to it once it is ready:

- ``merged_bf16``: a bfloat16 copy of the base with the adapter merged in memory (no export
  asked), decoded by core/inference/static_decode.py (static KV cache, one CUDA-graph replay
  per token): the path that reached 147 tokens/s on an H200 for a merged export.
- ``lora_4bit``: where a bf16 copy does not fit (a T4), the base in 4-bit (bitsandbytes NF4)
  with the adapter applied unmerged, through the same loop. bitsandbytes supports CUDA graphs
  for 4-bit since 0.44 and a Linear4bit that torch.compile traces whole (fullgraph) since 0.46
  with torch >= 2.8; peft's LoRA layers compile for inference with one active adapter. Should
  dynamo fail to trace the step whole, the step is compiled with graph breaks instead (each
  piece its own graph), and the build notes it.

Everything about fast models runs on one thread of their own, the engine's CUDA-graph lane:
loading, merging, torch.compile's tracing and code generation (tens of seconds, mostly CPU),
recording the graphs with a short answer (``install``), and every later answer. Inductor's
CUDA-graph trees keep their state per thread (a graph recorded on one thread cannot be
replayed from another, and a thread that did not import them has no state: ``own_graph_trees``
gives the lane its own). Meanwhile the engine's model thread keeps answering through
``for_inference``, and the engine routes nothing to the lane while it builds (``busy``). At
most ``capacity`` fast models are kept (least recently used out): each holds a copy of the
base.

Memory: a build starts only if the card's free memory holds the copy, its KV cache and a margin
(``room``); a job training on the same card may still grow, so the warm message that names one
(core/inference/warm.py) reserves its estimate until the job ends (core/inference/reserve.py).
What was decided, and why, is logged and kept in ``FastPaths.notes``. A build refused for room
is planned once more when memory frees (``retry``: a training job's reservation released, its
worker done with the job or a later export), not at every answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.inference.fast_multi import (
    MULTI_CACHE_TOKENS,
    MULTI_RANK,
    MULTI_SLOTS,
    MultiFast,
    build_multi,
    slot_bytes,
)
from core.inference.generate import Generation, GenerationRequest
from core.inference.graphs import bf16, load_plain, own_graph_trees, raise_recompile_limit
from core.inference.reserve import Reservations
from core.memory import GIB, ModelShape, shape_from_config

log = logging.getLogger(__name__)

STATIC_CACHE_TOKENS = 4096  # every graph is specialised to the cache length: one size for all
_NF4_BYTES = 0.5 + 0.07  # core/memory.py's figure: 4-bit weights and their quantisation state
_WARM_MESSAGES = [{"role": "user", "content": "Hi"}]


def weight_bytes(shape: ModelShape, *, four_bit: bool) -> int:
    """A loaded model's weights: projections in 4-bit or bf16, embeddings and head in bf16."""
    layers = sum(a * b for a, b in shape.projection_shapes().values()) * shape.num_hidden_layers
    embed = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    return int(layers * (_NF4_BYTES if four_bit else 2) + embed * 2)


def kv_cache_bytes(shape: ModelShape, tokens: int) -> int:
    """A bf16 static KV cache of ``tokens`` slots (keys and values of every layer)."""
    return 2 * shape.num_hidden_layers * tokens * shape.kv_size * 2


def inference_bytes(shape: ModelShape, *, four_bit: bool, cache_tokens: int) -> int:
    """One inference model: weights, a cache and a workspace (logits, activations, graphs)."""
    workspace = shape.vocab_size * 4 * 8 + GIB // 2
    return weight_bytes(shape, four_bit=four_bit) + kv_cache_bytes(shape, cache_tokens) + workspace


def room(need: int, *, free: int, total: int, reserved: int = 0) -> str | None:
    """None if ``need`` bytes fit in ``free`` beside ``reserved`` (a training job's growth) and a
    margin (5% of the card, at least 1 GiB); else why not, in words."""
    margin = max(GIB, total // 20)
    if need + reserved + margin <= free:
        return None
    held = f" and {reserved / GIB:.1f} GiB kept for training" if reserved else ""
    return (
        f"needs {need / GIB:.1f} GiB{held} plus a {margin / GIB:.1f} GiB margin; "
        f"{free / GIB:.1f} GiB of {total / GIB:.1f} GiB free"
    )


def model_shape(path: str) -> ModelShape | None:
    return shape_from_config(Path(path) / "config.json")


def gpu_memory() -> tuple[int, int]:
    """Free and total bytes of this process's card."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return int(free), int(total)


@dataclass
class Fast:
    """A model decoding one adapter (or a merged export) through the CUDA-graph loop."""

    decoder: Any  # core.inference.static_decode.StaticDecoder
    kind: str  # merged_bf16 | lora_4bit | merged_export
    fullgraph: bool = True

    def generate(self, request: GenerationRequest) -> Generation:
        return self.decoder.generate(request)


def _decoder(model: Any, tokenizer: Any, *, cache_tokens: int) -> tuple[Any, bool]:
    """A compiled StaticDecoder whose step has been traced and compiled (a two-token answer runs
    the compiled step once, which cudagraph trees run eagerly; ``install`` records)."""
    from core.inference.static_decode import StaticDecoder

    own_graph_trees()  # whichever thread builds (the lane, a benchmark's main thread)
    raise_recompile_limit()
    warm = GenerationRequest(messages=_WARM_MESSAGES, max_new_tokens=2)
    for fullgraph in (True, False):
        decoder = StaticDecoder(
            model, tokenizer, max_cache_tokens=cache_tokens, compile=True, fullgraph=fullgraph
        )
        try:
            decoder.generate(warm)
            return decoder, fullgraph
        except Exception as exc:  # dynamo's Unsupported and friends: retry with graph breaks
            if not fullgraph:
                raise
            log.warning("fast path: the step does not compile whole (%s); with graph breaks", exc)
    raise AssertionError("unreachable")


def build_merged(base_path: str, adapter_dir: str, tokenizer: Any, *, cache_tokens: int) -> Fast:
    """bf16 base + the adapter merged in memory, compiled (runs off the model thread)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from core.inference.cuda import restore_stock_rotary

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=bf16(), device_map={"": 0})
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()
    restore_stock_rotary(model)
    decoder, fullgraph = _decoder(model, tokenizer, cache_tokens=cache_tokens)
    return Fast(decoder, "merged_bf16", fullgraph)


def build_lora_4bit(base_path: str, adapter_dir: str, tokenizer: Any, *, cache_tokens: int) -> Fast:
    """4-bit base (bitsandbytes, not Unsloth) + the adapter unmerged, compiled."""
    from peft import PeftModel

    model = load_plain(base_path, four_bit=True)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    decoder, fullgraph = _decoder(model, tokenizer, cache_tokens=cache_tokens)
    return Fast(decoder, "lora_4bit", fullgraph)


def build_export(merged_dir: str, *, cache_tokens: int) -> Fast:
    """A job's merged_16bit export (the original fast path), compiled and recorded in place."""
    from core.inference.cuda import StaticCompiled

    own_graph_trees()
    compiled = StaticCompiled(merged_dir, max_cache_tokens=cache_tokens)
    compiled.warm_up()
    return Fast(compiled.decoder, "merged_export")


Builder = Callable[..., Fast]


class FastPaths:
    """The fast models of one engine, built and served on its CUDA-graph lane.

    ``run_on_lane(fn)`` queues ``fn`` on that lane (returns a Future). ``enabled`` false
    (MEDTUNE_INFER_FAST=off) builds nothing; merged exports still load on demand.

    Once two adapters of one base have been asked, the base's multi-LoRA model is built too
    (core/inference/fast_multi.py, one base at a time): every adapter that fits its slots is
    then served by it, concurrent requests to different adapters in one batch (``serves``).

    A build waits (up to ``idle_wait_s``) until ``idle()`` says the model thread has nothing
    to answer, so it does not start while a question (a new job's first) is being answered.
    """

    def __init__(
        self,
        *,
        run_on_lane: Callable[[Callable[[], None]], Any],
        loads: Counter[str],
        enabled: bool,
        capacity: int = 1,
        cache_tokens: int = STATIC_CACHE_TOKENS,
        builders: dict[str, Builder] | None = None,
        memory: Callable[[], tuple[int, int]] = gpu_memory,
        multi_builder: Callable[..., MultiFast] = build_multi,
        rows: int = 8,
        idle: Callable[[], bool] = lambda: True,
        idle_wait_s: float = 30.0,
    ) -> None:
        self._run = run_on_lane
        self.loads = loads
        self.enabled = enabled
        self.capacity = capacity
        self.cache_tokens = cache_tokens
        self.builders = builders or {"merged_bf16": build_merged, "lora_4bit": build_lora_4bit}
        self.memory = memory
        self.reservations = Reservations()  # what training on this card may still take
        self._ready: OrderedDict[str, Fast] = OrderedDict()
        self._building: set[str] = set()
        self.notes: dict[str, str] = {}  # adapter folder -> what was decided (why not, failures)
        self._lock = threading.Lock()
        self.builds: list[Any] = []  # the Futures of the builds queued on the lane
        self.multi_builder = multi_builder
        self.rows = rows
        self.idle = idle
        self.idle_wait_s = idle_wait_s
        self._multi: dict[str, MultiFast] = {}  # base path -> its multi-LoRA model (one)
        self._asked: dict[str, set[str]] = {}  # base path -> adapters asked of it
        self._fits: dict[str, str | None] = {}  # adapter folder -> why its slots refuse it
        self._refused: dict[str, tuple[str, Any]] = {}  # key -> (base, tokenizer): no room

    @property
    def reserved(self) -> int:
        """Bytes kept free for training on this card (core/inference/reserve.py)."""
        return self.reservations.total

    def reserve(self, owner: str, nbytes: int, *, worker: str | None = None) -> None:
        """Keep ``nbytes`` free for the training job ``owner`` until it is released."""
        self.reservations.hold(owner, nbytes, worker=worker)

    def release(self, owner: str) -> bool:
        """Only the job ``owner`` releases its reservation (then ``retry``); False if none."""
        return self.reservations.release(owner)

    def retry(self, why: str) -> int:
        """Memory was freed (``why``): plan each build refused for room once more (one refused
        again waits for the next time); returns how many were queued."""
        with self._lock:
            refused, self._refused = self._refused, {}
            for key in refused:
                self.notes.pop(key, None)
        queued = 0
        for key, (base_path, tokenizer) in refused.items():
            if key.startswith("multi:"):
                queued += self.start_multi(base_path, tokenizer)
            else:
                queued += self.want(base_path, key, tokenizer)
        if refused:
            log.info("fast paths: %s; %d of %d refused builds queued", why, queued, len(refused))
        return queued

    def _refuse(self, key: str, base_path: str, tokenizer: Any, why: str) -> None:
        """Note why ``key`` was not built; a refusal for room is planned again by ``retry``."""
        for_room = model_shape(base_path) is not None  # else nothing to size it by: for good
        with self._lock:
            self._building.discard(key)
            self.notes[key] = why
            if for_room:
                self._refused[key] = (base_path, tokenizer)

    @property
    def busy(self) -> bool:
        """A build is queued or running on the lane: send nothing there meanwhile."""
        return bool(self._building)

    def get(self, key: str | None) -> Fast | None:
        """The ready fast model of an adapter folder (or merged export), marked recently used."""
        if key is None:
            return None
        with self._lock:
            fast = self._ready.get(key)
            if fast is not None:
                self._ready.move_to_end(key)
            return fast

    def export(self, merged_dir: str) -> Fast:
        """A merged export's model, loaded and recorded now (on the model thread)."""
        fast = self.get(merged_dir)
        if fast is None:
            fast = build_export(merged_dir, cache_tokens=self.cache_tokens)
            self.loads["merged"] += 1
            self._keep(merged_dir, fast)
        return fast

    def plan(self, base_path: str) -> tuple[str | None, str]:
        """Which fast model fits this card now (None: none) and why."""
        shape = model_shape(base_path)
        if shape is None:
            return None, "the base's config.json gives no shape to size the fast path by"
        free, total = self.memory()
        reasons = []
        for kind in self.builders:
            need = inference_bytes(
                shape, four_bit=kind == "lora_4bit", cache_tokens=self.cache_tokens
            )
            why = room(need, free=free, total=total, reserved=self.reserved)
            if why is None:
                return kind, f"{kind}: {need / GIB:.1f} GiB fits"
            reasons.append(f"{kind} {why}")
        return None, "no fast path: " + "; ".join(reasons)

    def want(self, base_path: str, adapter_dir: str, tokenizer: Any) -> bool:
        """Start building the adapter's fast model unless it is ready, building or refused (and
        the base's multi-LoRA model, the second adapter asked of it). An adapter the multi-LoRA
        model serves (or will: it is being built) gets no model of its own, which would keep
        the lane busy and hold a copy of the base per adapter. Returns whether a build of the
        adapter's own started."""
        self._want_multi(base_path, adapter_dir, tokenizer)
        if f"multi:{base_path}" in self._building or self.serves(base_path, adapter_dir):
            return False
        with self._lock:
            if (
                not self.enabled
                or adapter_dir in self._ready
                or adapter_dir in self._building
                or adapter_dir in self.notes
            ):
                return False
            self._building.add(adapter_dir)
        kind, why = self.plan(base_path)
        if kind is None:
            log.info("fast path for %s not built: %s", adapter_dir, why)
            self._refuse(adapter_dir, base_path, tokenizer, why)
            return False
        log.info("fast path for %s: building %s (%s)", adapter_dir, kind, why)
        self._queue_build(lambda: self._build(kind, base_path, adapter_dir, tokenizer))
        return True

    def _queue_build(self, fn: Any) -> None:
        queued = self._run(fn)
        # Finished builds are dropped: a long-lived worker would keep every Future otherwise.
        with self._lock:  # ``retry`` queues from a task's thread, ``want`` from the model's
            running = [f for f in self.builds if isinstance(f, Future) and not f.done()]
            self.builds = [*running, queued]

    def _build(self, kind: str, base_path: str, adapter_dir: str, tokenizer: Any) -> None:
        """On the lane: build, then record and serve (``install``)."""
        self._wait_idle()
        try:
            own_graph_trees()
            fast = self.builders[kind](
                base_path, adapter_dir, tokenizer, cache_tokens=self.cache_tokens
            )
        except Exception as exc:
            log.exception("fast path for %s failed to build", adapter_dir)
            with self._lock:
                self._building.discard(adapter_dir)
                self.notes[adapter_dir] = f"{kind} failed: {type(exc).__name__}: {exc}"[:300]
            return
        self.install(adapter_dir, fast)

    def serves(self, base_path: str, adapter_dir: str | None) -> MultiFast | None:
        """The base's multi-LoRA model, if it is ready and ``adapter_dir`` fits its slots."""
        multi = self._multi.get(base_path)
        if multi is None or adapter_dir is None:
            return None
        if adapter_dir not in self._fits:
            self._fits[adapter_dir] = multi.slots.check(adapter_dir)
            if self._fits[adapter_dir]:
                log.info("multi-LoRA: %s not in slots: %s", adapter_dir, self._fits[adapter_dir])
        return None if self._fits[adapter_dir] else multi

    def multi(self, base_path: str) -> MultiFast | None:
        return self._multi.get(base_path)

    def _want_multi(self, base_path: str, adapter_dir: str, tokenizer: Any) -> None:
        with self._lock:
            asked = self._asked.setdefault(base_path, set())
            asked.add(adapter_dir)
            if len(asked) < 2:
                return
        self.start_multi(base_path, tokenizer)

    def start_multi(self, base_path: str, tokenizer: Any, *, kind: str | None = None) -> bool:
        """Queue the base's multi-LoRA build on the lane unless one is ready (for any base),
        building or refused; returns whether it was queued (its Future: ``builds[-1]``).
        ``kind`` (multi_bf16, multi_4bit) skips the memory plan (benchmarks)."""
        key = f"multi:{base_path}"
        with self._lock:
            if not self.enabled or self._multi or key in self._building or key in self.notes:
                return False
            self._building.add(key)
        kind, why = (kind, "asked for") if kind else self.plan_multi(base_path)
        if kind is None:
            log.info("multi-LoRA for %s not built: %s", base_path, why)
            self._refuse(key, base_path, tokenizer, why)
            return False
        log.info("multi-LoRA for %s: building %s (%s)", base_path, kind, why)
        four_bit = kind == "multi_4bit"
        self._queue_build(lambda: self._build_multi(key, base_path, tokenizer, four_bit=four_bit))
        return True

    def plan_multi(self, base_path: str) -> tuple[str | None, str]:
        """The multi-LoRA model that fits this card now: bf16, else 4-bit (None: neither)."""
        shape = model_shape(base_path)
        if shape is None:
            return None, "the base's config.json gives no shape to size the multi-LoRA model by"
        free, total = self.memory()
        reasons = []
        for kind in ("multi_bf16", "multi_4bit"):
            need = inference_bytes(
                shape, four_bit=kind == "multi_4bit", cache_tokens=MULTI_CACHE_TOKENS * self.rows
            ) + slot_bytes(shape, slots=MULTI_SLOTS, rank=MULTI_RANK)
            why = room(need, free=free, total=total, reserved=self.reserved)
            if why is None:
                return kind, f"{kind}: {need / GIB:.1f} GiB fits"
            reasons.append(f"{kind} {why}")
        return None, "no multi-LoRA model: " + "; ".join(reasons)

    def _build_multi(self, key: str, base_path: str, tokenizer: Any, *, four_bit: bool) -> None:
        """On the lane: build, record the graphs with a short batch, then serve."""
        self._wait_idle()
        try:
            own_graph_trees()
            multi = self.multi_builder(base_path, tokenizer, four_bit=four_bit, rows=self.rows)
            warm = GenerationRequest(messages=_WARM_MESSAGES, max_new_tokens=4)
            multi.decoder.generate([warm], [None])
        except Exception as exc:
            log.exception("multi-LoRA for %s failed to build", base_path)
            with self._lock:
                self._building.discard(key)
                self.notes[key] = f"multi-LoRA failed: {type(exc).__name__}: {exc}"[:300]
            return
        self.loads["multi"] += 1
        with self._lock:
            self._multi[base_path] = multi
            self._building.discard(key)
        log.info(
            "multi-LoRA for %s ready (%s, fullgraph %s)", base_path, multi.kind, multi.fullgraph
        )

    def _wait_idle(self) -> None:
        """Let the model thread answer what it has before a build takes the card and the CPU."""
        deadline = time.monotonic() + self.idle_wait_s
        while not self.idle() and time.monotonic() < deadline:
            time.sleep(0.02)

    def install(self, key: str, fast: Fast) -> None:
        """On the lane: record the graphs with a short answer, then serve from it."""
        try:
            fast.generate(GenerationRequest(messages=_WARM_MESSAGES, max_new_tokens=4))
        except Exception as exc:
            with self._lock:
                self._building.discard(key)
                self.notes[key] = f"{fast.kind} failed on its first answer: {exc}"[:300]
            raise
        self.loads["fast"] += 1
        self._keep(key, fast)
        with self._lock:
            self._building.discard(key)
        log.info("fast path for %s ready (%s, fullgraph %s)", key, fast.kind, fast.fullgraph)

    def _keep(self, key: str, fast: Fast) -> None:
        with self._lock:
            self._ready[key] = fast
            evicted = []
            while len(self._ready) > self.capacity:
                evicted.append(self._ready.popitem(last=False))
        for old, _ in evicted:
            self.loads["fast_evicted"] += 1
            log.info("fast path for %s evicted (least recently used)", old)
        if evicted:
            del evicted
            _free_cuda()


def _free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
