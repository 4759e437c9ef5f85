"""The multi-LoRA fast model of a base: every adapter of that base through one CUDA-graph loop.

Built on the engine's CUDA-graph lane (core/inference/fast.py) once two adapters of one base
have been asked: the base loaded by transformers alone (bf16 where the card has room, else
4-bit bitsandbytes), its projections given LoRA slots (core/inference/multi_lora.py) and a
``BatchDecoder`` (core/inference/batch_decode.py) of ``rows`` rows whose step is compiled once.
An adapter then needs no build of its own: its first request copies its weights into a slot
(milliseconds) and concurrent requests to different adapters share each step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from core.inference.batching import Pending, settle
from core.inference.generate import GenerationRequest
from core.memory import ModelShape

log = logging.getLogger(__name__)

MULTI_SLOTS = 16  # adapters held at once per base
MULTI_RANK = 16  # the slots' rank: an adapter of a higher rank keeps its own fast model
MULTI_ROWS = 8  # requests decoded together (the engine's max_batch at most)
MULTI_CACHE_TOKENS = 2048  # per row: 8 rows of an 8B's KV cache in 2 GiB
_WARM = [{"role": "user", "content": "Hi"}]


@dataclass
class MultiFast:
    """A base with LoRA slots, decoding a batch of rows (adapters mixed) per graph replay."""

    decoder: Any  # core.inference.batch_decode.BatchDecoder
    kind: str  # multi_bf16 | multi_4bit
    fullgraph: bool = True

    @property
    def rows(self) -> int:
        return int(self.decoder.rows)

    @property
    def slots(self) -> Any:
        return self.decoder.slots


def slot_bytes(shape: ModelShape, *, slots: int, rank: int) -> int:
    """The bf16 A and B stacks of every projection of every layer."""
    per_layer = sum(a + b for a, b in shape.projection_shapes().values())
    return per_layer * shape.num_hidden_layers * rank * slots * 2


def build_multi(
    base_path: str,
    tokenizer: Any,
    *,
    four_bit: bool,
    cache_tokens: int = MULTI_CACHE_TOKENS,
    slots: int = MULTI_SLOTS,
    rank: int = MULTI_RANK,
    rows: int = MULTI_ROWS,
    compile: bool = True,
) -> MultiFast:
    """Load, give LoRA slots, compile (a two-token batch traces the step; on the lane)."""
    from core.inference.batch_decode import BatchDecoder
    from core.inference.graphs import load_plain, own_graph_trees, raise_recompile_limit
    from core.inference.multi_lora import LoraSlots, inject

    own_graph_trees()
    raise_recompile_limit()
    model = load_plain(base_path, four_bit=four_bit)
    layers, index = inject(model, slots=slots, rank=rank, rows=rows)
    lora = LoraSlots(layers, index)
    warm = [GenerationRequest(messages=_WARM, max_new_tokens=2)]
    kind = "multi_4bit" if four_bit else "multi_bf16"
    for fullgraph in (True, False):
        decoder = BatchDecoder(
            model,
            tokenizer,
            lora,
            rows=rows,
            max_cache_tokens=cache_tokens,
            compile=compile,
            fullgraph=fullgraph,
        )
        try:
            decoder.generate(warm, [None])
            return MultiFast(decoder, kind, fullgraph)
        except Exception as exc:  # dynamo's Unsupported and friends: retry with graph breaks
            if not fullgraph:
                raise
            log.warning("multi-LoRA: the step does not compile whole (%s); with graph breaks", exc)
    raise AssertionError("unreachable")


def answer_batch(
    multi: MultiFast,
    group: Sequence[Pending],
    *,
    generation: Callable[[Any], GenerationRequest],
    fall_back: Callable[[Sequence[Pending]], None],
) -> None:
    """Answer the engine's requests (``Pending``) to adapters of one base, ``multi.rows`` at a
    time; one whose prompt does not fit a row, or a batch whose adapter went away meanwhile,
    goes to ``fall_back`` (the model thread)."""
    gens = [(p, generation(p.request)) for p in group]
    fall_back([p for p, gen in gens if not multi.decoder.fits(gen)])
    gens = [(p, gen) for p, gen in gens if multi.decoder.fits(gen)]
    for start in range(0, len(gens), multi.rows):
        chunk = gens[start : start + multi.rows]
        adapters = [p.request.adapter_dir for p, _ in chunk]
        try:
            answers = multi.decoder.generate([gen for _, gen in chunk], adapters)
        except (OSError, ValueError) as exc:  # an adapter deleted or changed since
            log.warning("multi-LoRA batch refused (%s): the model thread answers", exc)
            fall_back([p for p, _ in chunk])
            continue
        for (pending, _), gen in zip(chunk, answers, strict=True):
            settle(pending, gen, backend="cuda_static", batch_size=len(chunk), fast_path=multi.kind)
