"""The data stage end to end: load, clean, dedupe, render, tokenize, filter, gate, split.

Used by the pipeline before training and by dataset previews; needs a tokenizer, not torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from core.data.cleaning import dedupe, validation_split
from core.data.conversations import Example, to_examples
from core.data.gate import TokenRules, enforce, token_rules
from core.data.sources import Loaded, load
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
    """Examples after cleaning, encoded but not yet gated or split."""

    loaded: Loaded
    examples: list[Example]
    items: list[Encoded]
    dropped: Counter[str]
    layout: str
    template: str
    rules: TokenRules


def render_dataset(
    section: DatasetSection, tokenizer: Any, *, max_seq_length: int, limit: int | None = None
) -> Rendered:
    """Load and clean the rows, then render and tokenize (the first ``limit``) examples."""
    loaded = load(section)
    conv = to_examples(
        loaded.rows, system_prompt=section.system_prompt, input_field=section.input_field
    )
    examples, duplicates = dedupe(conv.examples, section.dedupe)
    dropped = loaded.dropped + conv.dropped + duplicates
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
        loaded=loaded,
        examples=examples,
        items=items,
        dropped=dropped,
        layout=conv.layout,
        template=template,
        rules=token_rules(tokenizer),
    )


def prepare(section: DatasetSection, tokenizer: Any, *, max_seq_length: int) -> Prepared:
    """Everything before training; raises DatasetGateError on the first example at fault."""
    rendered = render_dataset(section, tokenizer, max_seq_length=max_seq_length)
    enforce(
        rendered.items,
        rendered.examples,
        rendered.rules,
        max_truncated_share=section.max_truncated_share,
        max_seq_length=max_seq_length,
    )
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
    stats = {
        "source": section.name,
        "format": rendered.loaded.format,
        "layout": rendered.layout,
        "chat_template": rendered.template,
        "max_seq_length": max_seq_length,
        **dataset_stats(
            items=train,
            examples=train_ex,
            validation=len(val_ex),
            rows=len(rendered.loaded.rows) + sum(rendered.loaded.dropped.values()),
            dropped=dropped,
            default_source=section.name,
        ),
    }
    return Prepared(
        train=train,
        validation=[by_id[id(e)] for e in val_ex],
        examples=train_ex,
        validation_examples=val_ex,
        stats=stats,
    )
