"""The data stage end to end: load, clean, dedupe, render, tokenize, filter, gate, split.

Used by the pipeline before training and by dataset previews; needs a tokenizer, not torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from core.data.cleaning import validation_split
from core.data.conversations import Example
from core.data.gate import DatasetGateError, TokenRules, enforce, inspect, token_rules
from core.data.mix import Collected, by_dataset, collect
from core.data.stats import dataset_stats
from core.data.tokenize import IGNORE_INDEX, Encoded, encode_all, ensure_chat_template
from core.errors import DatasetError
from core.spec import DatasetSection


@dataclass
class Prepared:
    train: list[Encoded]
    validation: list[Encoded]
    examples: list[Example]  # the training examples, parallel to ``train``
    validation_examples: list[Example] = field(default_factory=list)  # parallel to validation
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rendered:
    """Examples after cleaning (and the mix), encoded but not yet gated or split."""

    collected: Collected
    examples: list[Example]
    items: list[Encoded]
    dropped: Counter[str]
    layout: str
    template: str
    rules: TokenRules


def render_dataset(
    section: DatasetSection, tokenizer: Any, *, max_seq_length: int, limit: int | None = None
) -> Rendered:
    """Load and clean the rows (and draw the mix), then render and tokenize (the first
    ``limit``) examples."""
    collected = collect(section)
    examples = collected.examples
    dropped = Counter(collected.dropped)
    if limit is not None:
        examples = examples[:limit]
    template = ensure_chat_template(tokenizer, section.chat_template)
    encoded = encode_all(
        tokenizer,
        examples,
        max_length=max_seq_length,
        train_on_prompt=section.train_on_prompt,
    )
    items = encoded.items
    if section.min_tokens or section.max_tokens:
        low, high = section.min_tokens or 0, section.max_tokens or float("inf")
        keep = []
        for example, item in zip(examples, items, strict=True):
            if item.length < low:
                dropped["shorter_than_min_tokens"] += 1
            elif item.length > high:
                dropped["longer_than_max_tokens"] += 1
            else:
                keep.append((example, item))
        examples, items = [e for e, _ in keep], [i for _, i in keep]
    if not items:
        raise DatasetError(
            f"no example is left after cleaning and filters ({dict(dropped)})",
            field="training_dataset",
            code="dataset_empty",
        )
    return Rendered(
        collected=collected,
        examples=examples,
        items=items,
        dropped=dropped,
        layout=collected.layout,
        template=template,
        rules=token_rules(tokenizer),
    )


def prepare(section: DatasetSection, tokenizer: Any, *, max_seq_length: int) -> Prepared:
    """Everything before training; raises DatasetGateError on the first example at fault.

    The error carries the statistics of every rendered example (``dataset_stats``), so a job
    the gate fails still shows what was wrong with its data.
    """
    rendered = render_dataset(section, tokenizer, max_seq_length=max_seq_length)
    try:
        enforce(
            rendered.items,
            rendered.examples,
            rendered.rules,
            max_truncated_share=section.max_truncated_share,
            max_seq_length=max_seq_length,
        )
    except DatasetGateError as exc:
        exc.dataset_stats = _stats(
            section,
            rendered,
            items=rendered.items,
            train=rendered.examples,
            validation=[],
            dropped=rendered.dropped,
            max_seq_length=max_seq_length,
        )
        findings = inspect(
            rendered.items,
            rendered.examples,
            rendered.rules,
            max_truncated_share=section.max_truncated_share,
            max_seq_length=max_seq_length,
        )
        exc.dataset_stats["gate"] = {
            "passed": False,
            "problem_count": len(findings),
            "problems": [asdict(f) for f in findings[:20]],
        }
        raise
    dropped = rendered.dropped
    pairs = []
    for example, item in zip(rendered.examples, rendered.items, strict=True):
        # A prompt that fills max_seq_length leaves nothing to learn from (a NaN loss on its own).
        if all(label == IGNORE_INDEX for label in item.labels):
            dropped["prompt_fills_max_seq_length"] += 1
        else:
            pairs.append((example, item))
    by_id = {id(e): i for e, i in pairs}
    train_ex, val_ex = validation_split(
        [e for e, _ in pairs], share=section.validation_share, seed=section.validation_seed
    )
    train = [by_id[id(e)] for e in train_ex]
    stats = _stats(
        section,
        rendered,
        items=train,
        train=train_ex,
        validation=val_ex,
        dropped=dropped,
        max_seq_length=max_seq_length,
    )
    stats["gate"] = {"passed": True, "problem_count": 0, "problems": []}
    return Prepared(
        train=train,
        validation=[by_id[id(e)] for e in val_ex],
        examples=train_ex,
        validation_examples=val_ex,
        stats=stats,
    )


def _stats(
    section: DatasetSection,
    rendered: Rendered,
    *,
    items: list[Encoded],
    train: list[Example],
    validation: list[Example],
    dropped: Counter[str],
    max_seq_length: int,
) -> dict[str, Any]:
    collected = rendered.collected
    sources = collected.summaries()
    in_train, in_validation = by_dataset(train), by_dataset(validation)
    for entry in sources:
        entry["examples"] = in_train[entry["index"]]
        entry["validation_examples"] = in_validation[entry["index"]]
    return {
        "source": "mix" if collected.is_mix else section.name,
        "format": collected.format,
        "layout": rendered.layout,
        "chat_template": rendered.template,
        "max_seq_length": max_seq_length,
        **dataset_stats(
            items=items,
            examples=train,
            validation=len(validation),
            rows=collected.rows,
            dropped=dropped,
            default_source=section.name,
        ),
        "sources": sources,
    }
