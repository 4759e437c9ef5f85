"""Gradient checkpointing only where the card needs it (issue 13).

Checkpointing trades speed for memory: every layer's forward runs twice. The recipe asks for it
because a 16 GB T4 cannot hold an 8B model's activations; on a card that holds them it only
slows each step. It does not change the math (same loss, same gradients), so, like the split of
an optimizer step into rows, it is the worker's business: on CUDA, when an SFT job's fullest
step fits the card's free memory without checkpointing (with room to spare), the worker trains
without it and notes why; an out-of-memory turns it back on (core/pipeline.py). DPO / ORPO
keep what they ask.
``MEDTUNE_SKIP_CHECKPOINTING_WHEN_ROOM=false`` keeps the spec's.
"""

from __future__ import annotations

from typing import Any

from core.memory import GIB, ModelShape, estimate
from core.spec import JobSpec

# Share of the card's free memory a job without checkpointing may plan to use: the estimate is
# a fit, and an inference worker on the same card may build its fast path beside the job.
FREE_SHARE = 0.6


def most_step_tokens(spec: JobSpec) -> int:
    """The most tokens one row of an optimizer step can hold: every example of the step at
    max_seq_length (unpacked rows fold a whole step), or one packed row."""
    cfg = spec.training
    if cfg.packing:
        return cfg.per_device_train_batch_size * spec.model.max_seq_length
    examples = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    return examples * spec.model.max_seq_length


def step_tokens(spec: JobSpec, items: list[Any]) -> int:
    """The tokens of the fullest optimizer step of ``items`` (encoded examples) as the trainer
    lays them out: a row never holds more."""
    from core.training.packing import largest_step

    cfg = spec.training
    if cfg.packing:
        return most_step_tokens(spec)
    examples = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    return largest_step(items, examples_per_step=examples, seed=cfg.seed)


def with_checkpointing(spec: JobSpec, value: bool | str | None) -> JobSpec:
    """``spec`` as trained: its checkpointing replaced by what the worker chose (None: as
    asked)."""
    if value is None or value == spec.lora.use_gradient_checkpointing:
        return spec
    lora = spec.lora.model_copy(update={"use_gradient_checkpointing": value})
    return spec.model_copy(update={"lora": lora})


def choose(
    spec: JobSpec,
    shape: ModelShape | None,
    *,
    engine: str,
    free_bytes: int | None,
    tokens: int | None = None,
) -> tuple[bool | str, str | None]:
    """The checkpointing to train with and, when it is not the spec's, the note saying why.
    ``free_bytes``: the CUDA card's free memory (None: not on CUDA, keep the spec's);
    ``tokens``: the job's fullest step (``step_tokens``; None: the most the spec allows)."""
    asked = spec.lora.use_gradient_checkpointing
    if not asked or free_bytes is None or shape is None or spec.training.method != "sft":
        return asked, None
    tokens = tokens or most_step_tokens(spec)
    need = estimate(with_checkpointing(spec, False), shape, engine=engine, tokens=tokens)
    # The base is loaded already (free memory is what is left beside it): what the job adds.
    adds = need.total_gib - need.weights_gib
    if adds * GIB > free_bytes * FREE_SHARE:
        return asked, None
    note = (
        f"gradient checkpointing skipped: this card holds the job's largest step ({tokens} "
        f"tokens) without it (estimate {adds:.1f} GiB beside the base, {free_bytes / GIB:.0f} "
        "GiB free), so no layer runs twice; the math is the same; an out-of-memory turns it "
        "back on (MEDTUNE_SKIP_CHECKPOINTING_WHEN_ROOM=false keeps it)"
    )
    return False, note


def skipped(spec: JobSpec, loaded: Any) -> bool:
    """Whether the worker trains ``loaded`` without the checkpointing ``spec`` asks for."""
    return bool(spec.lora.use_gradient_checkpointing) and loaded.checkpointing is False


def free_cuda_bytes() -> int | None:
    """Free memory of this process's CUDA card, under its per-process cap if one is set."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    cap = _process_cap(torch, total)
    if cap is not None:
        free = min(free, max(cap - torch.cuda.memory_reserved(), 0))
    return int(free)


def _process_cap(torch: Any, total: int) -> int | None:
    """The cap ``torch.cuda.set_per_process_memory_fraction`` set (the T4 run), if any."""
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.10
    fraction = getter() if getter is not None else None
    if fraction is None or fraction >= 1.0:
        return None
    return int(total * fraction)
