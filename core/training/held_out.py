"""Which held-out examples the eval loss is measured on (training_config.eval_max_examples)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from core.spec import JobSpec

T = TypeVar("T")


def sample_held_out(items: Sequence[T], *, limit: int | None, seed: int) -> list[T]:
    """All of ``items`` when there are at most ``limit`` (None: no limit), else a seeded
    random sample of ``limit`` of them, kept in their order."""
    if limit is None or len(items) <= limit:
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def eval_sample(spec: JobSpec, items: Sequence[T]) -> tuple[list[T], str | None]:
    """The held-out examples a job's eval loss is measured on, and the note that says so
    (None where there is no eval loss)."""
    cfg = spec.training
    sample = sample_held_out(items, limit=cfg.eval_max_examples, seed=cfg.seed)
    if not items or cfg.eval_strategy == "no":
        return sample, None
    if len(sample) == len(items):
        return sample, f"eval loss on all {len(items)} held-out examples"
    return sample, (
        f"eval loss on a seeded sample of {len(sample)} of the {len(items)} held-out examples "
        "(training_config.eval_max_examples)"
    )
