"""Read a dataset section's sources and clean them; draw a weighted mix when there are several.

Each source is loaded, turned into conversations and de-duplicated on its own (duplicates of an
earlier source count against the later one), as LLaMA-Factory aligns each dataset before merging.
A mix then takes ``round(size * weight / sum(weights))`` examples from each source by a seeded
draw without replacement, and shuffles the union with the same seed, so the same spec always
trains on the same examples in the same order.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from core.data.cleaning import Seen, dedupe, drop_looping
from core.data.conversations import to_examples
from core.data.example import Example
from core.data.sources import FIELD, load, scoped, source_section
from core.data.text import text_examples
from core.errors import DatasetError
from core.spec import DatasetSection


@dataclass
class Part:
    """One source, loaded and cleaned, and how many of its examples the mix took."""

    index: int
    name: str
    weight: float
    format: str
    layout: str
    rows: int  # rows read, skipped MedQuAD pairs included
    examples: list[Example]
    dropped: Counter[str]
    system_from: Counter[str]
    taken: int = 0

    def summary(self, share: float) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "weight": self.weight,
            "share": round(share, 4),
            "format": self.format,
            "layout": self.layout,
            "rows": self.rows,
            "dropped": dict(self.dropped.most_common()),
            "cleaned": len(self.examples),
            "taken": self.taken,
            "repeated": max(0, self.taken - len(self.examples)),
        }


@dataclass
class Collected:
    """The cleaned examples (mixed when there are several sources) and where they came from."""

    examples: list[Example]
    dropped: Counter[str]
    parts: list[Part]
    is_mix: bool

    @property
    def format(self) -> str:
        return _joined(p.format for p in self.parts)

    @property
    def layout(self) -> str:
        return _joined(p.layout for p in self.parts)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    def system_prompt(self, source: str) -> dict[str, Any]:
        """Which system text the cleaned examples got (before the mix's draw): the setting, and
        how many took the row's own, the job's system_prompt, or none."""
        counts: Counter[str] = Counter()
        for part in self.parts:
            counts += part.system_from
        return {"source": source, **{k: counts[k] for k in ("row", "job", "none")}}

    def summaries(self) -> list[dict[str, Any]]:
        total = sum(p.weight for p in self.parts)
        return [p.summary(p.weight / total) for p in self.parts]


def _joined(values: Any) -> str:
    return "+".join(dict.fromkeys(values))  # distinct, in source order


def _read(section: DatasetSection, *, index: int, weight: float, seen: Seen) -> Part:
    loaded = load(section)
    if loaded.format == "text":  # format "text", or .txt files: documents, no conversations
        conv = text_examples(loaded.rows, input_field=section.input_field)
    else:
        conv = to_examples(
            loaded.rows,
            system_prompt=section.system_prompt,
            input_field=section.input_field,
            system_prompt_source=section.system_prompt_source,
        )
    examples, dropped = dedupe(conv.examples, section.dedupe, seen=seen)
    if section.drop_looping_answers:
        examples, looping = drop_looping(examples)
        dropped += looping
    return Part(
        index=index,
        name=section.name,
        weight=weight,
        format=loaded.format,
        layout=conv.layout,
        rows=len(loaded.rows) + sum(loaded.dropped.values()),
        examples=examples,
        dropped=loaded.dropped + conv.dropped + dropped,
        system_from=conv.system_from,
    )


def collect(section: DatasetSection) -> Collected:
    """Load and clean every source; for a mix, draw each source's share and shuffle."""
    seen = Seen()
    if section.sources is None:
        part = _read(section, index=0, weight=1.0, seen=seen)
        part.taken = len(part.examples)
        return Collected(part.examples, Counter(part.dropped), [part], is_mix=False)
    parts = []
    for index, source in enumerate(section.sources):
        with scoped(section, index):
            part = _read(
                source_section(section, index), index=index, weight=source.weight, seen=seen
            )
        if not part.examples:
            raise DatasetError(
                f"source {index} ({source.name!r}) has no example left after cleaning "
                f"({dict(part.dropped)}); remove it from the mix or fix its columns",
                field=f"{FIELD}.sources[{index}]",
                code="dataset_empty",
            )
        for example in part.examples:
            example.meta["dataset"] = source.name
            example.meta["dataset_index"] = index
        parts.append(part)
    dropped: Counter[str] = Counter()
    for part in parts:
        dropped += part.dropped
    collected = Collected([], dropped, parts, is_mix=True)
    try:
        counts = plan(
            [len(p.examples) for p in parts],
            [p.weight for p in parts],
            size=section.mix_size,
            oversample=section.mix_oversample,
        )
    except MixTooSmall as exc:
        # Stored on the failed job, so GET /jobs/{id}/dataset shows each source's counts.
        exc.dataset_stats = {
            "rows": collected.rows,
            "dropped": dict(dropped.most_common()),
            "sources": collected.summaries(),
        }
        raise
    mixed: list[Example] = []
    for part, count in zip(parts, counts, strict=True):
        part.taken = count
        mixed += draw(part.examples, count, random.Random(f"{section.mix_seed}:{part.index}"))
    random.Random(f"{section.mix_seed}:order").shuffle(mixed)
    if not mixed:
        raise DatasetError(
            "the mix takes no example: every source is empty after cleaning",
            field=f"{FIELD}.sources",
            code="dataset_empty",
        )
    collected.examples = mixed
    return collected


class MixTooSmall(DatasetError):
    """A source has fewer cleaned examples than its share of mix_size."""

    code = "dataset_mix_too_small"

    def __init__(self, detail: str, *, field: str) -> None:
        super().__init__(detail, field=field)
        self.dataset_stats: dict[str, Any] | None = None


def plan(
    available: list[int],
    weights: list[float],
    *,
    size: int | None,
    oversample: bool,
) -> list[int]:
    """How many examples each source gives: shares of ``size`` by largest remainder.

    With no size, the largest mix in which no source gives more than it has.
    """
    total = sum(weights)
    shares = [w / total for w in weights]
    if size is None:
        size = int(min(n / s for n, s in zip(available, shares, strict=True)))
        counts = _apportion(size, shares)
        while any(c > n for c, n in zip(counts, available, strict=True)):  # float rounding
            size -= 1
            counts = _apportion(size, shares)
        return counts
    counts = _apportion(size, shares)
    if not oversample:
        for index, (count, have) in enumerate(zip(counts, available, strict=True)):
            if count > have:
                fits = int(min(n / s for n, s in zip(available, shares, strict=True)))
                raise MixTooSmall(
                    f"source {index} has {have} examples after cleaning, but its weight "
                    f"{weights[index]:g} of {total:g} asks for {count} of mix_size {size}; "
                    f"lower mix_size (at most {fits} fits without repeats), lower that "
                    "source's weight, or set mix_oversample to repeat its examples",
                    field=f"{FIELD}.mix_size",
                )
    return counts


def _apportion(size: int, shares: list[float]) -> list[int]:
    quotas = [size * s for s in shares]
    counts = [int(q) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in order[: size - sum(counts)]:
        counts[i] += 1
    return counts


def draw(examples: list[Example], count: int, rng: random.Random) -> list[Example]:
    """``count`` examples without replacement; beyond one whole pass, whole passes repeat."""
    if not examples:
        return []
    passes, rest = divmod(count, len(examples))
    picked = list(range(len(examples))) * passes + sorted(rng.sample(range(len(examples)), rest))
    return [examples[i] for i in picked]


def by_dataset(examples: list[Example]) -> Counter[int]:
    """Examples per source index (a mix tags each example with its source)."""
    return Counter(int(e.meta.get("dataset_index", 0)) for e in examples)
