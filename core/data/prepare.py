"""The data stage end to end: load, clean, dedupe, render, tokenize, filter, gate, split.

The validation split is a share held out of the training data (``validation_share``), or a
separate validation set (``validation_dataset``) prepared the same way, without the examples
that are also in the training set.

Used by the pipeline before training and by dataset previews; needs a tokenizer, not torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from core.data.cleaning import Seen, dedupe, validation_split
from core.data.example import Example
from core.data.gate import DatasetGateError, TokenRules, enforce, inspect, token_rules
from core.data.mix import Collected, by_dataset, collect
from core.data.stats import dataset_stats
from core.data.text import split_windows
from core.data.tokenize import IGNORE_INDEX, Encoded, encode_all, ensure_chat_template
from core.data.validation import FIELD as VALIDATION_FIELD
from core.data.validation import scoped as validation_scoped
from core.data.validation import validation_section
from core.errors import DatasetError
from core.spec import DatasetSection, ValidationDataset


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
    # Raw-text documents longer than max_seq_length become windows of it (format "text").
    examples, items = split_windows(examples, encoded.items, max_length=max_seq_length)
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


def prepare(
    section: DatasetSection,
    tokenizer: Any,
    *,
    max_seq_length: int,
    validation: ValidationDataset | None = None,
) -> Prepared:
    """Everything before training; raises DatasetGateError on the first example at fault.

    The error carries the statistics of every rendered example (``dataset_stats``), so a job
    the gate fails still shows what was wrong with its data. With ``validation`` (the job's
    validation_dataset), that set is the validation split, and ``section.validation_share``
    must be 0 (JobSpec refuses both).
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
    if validation is None:
        train_ex, val_ex = validation_split(
            [e for e, _ in pairs], share=section.validation_share, seed=section.validation_seed
        )
        val_items = [by_id[id(e)] for e in val_ex]
    else:
        train_ex, val_ex = [e for e, _ in pairs], []
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
    if validation is None:
        stats["validation"] = _share_stats(section, stats, len(val_ex))
    else:
        try:
            held = _prepare_validation(
                section, validation, tokenizer, max_seq_length=max_seq_length, train=train_ex
            )
        except DatasetGateError as exc:
            # The training set passed: the stored statistics show it, and the refused set.
            stats["validation"] = exc.dataset_stats
            exc.dataset_stats = stats
            raise
        val_ex, val_items = held.examples, held.items
        stats["validation_examples"] = len(val_ex)
        stats["validation"] = held.stats
    _check_enough(section, len(train), stats)
    return Prepared(
        train=train,
        validation=val_items,
        examples=train_ex,
        validation_examples=val_ex,
        stats=stats,
    )


def _check_enough(section: DatasetSection, count: int, stats: dict[str, Any]) -> None:
    """Refuse before the model is loaded a job left with too few examples to learn from."""
    if count >= section.min_examples:
        return
    dropped = stats.get("dropped") or {}
    error = DatasetGateError(
        f"{count} training example(s) left after cleaning, filters and the validation split "
        f"(of {stats['rows']} rows; dropped: {dropped or 'none'}), fewer than "
        f"training_dataset.min_examples ({section.min_examples}); give more rows, or lower "
        "min_examples",
        code="dataset_too_small",
        field="training_dataset.min_examples",
    )
    error.dataset_stats = stats  # GET /jobs/{id}/dataset shows what was left and why
    raise error


def _share_stats(
    section: DatasetSection, stats: dict[str, Any], count: int
) -> dict[str, Any] | None:
    """Where a validation split held out of the training data came from; None without one."""
    if not count:
        return None
    return {
        "kind": "validation_share",
        "source": stats["source"],
        "share": section.validation_share,
        "seed": section.validation_seed,
        "examples": count,
    }


@dataclass
class HeldOut:
    """A separate validation set, prepared: examples parallel to items, and its statistics."""

    examples: list[Example]
    items: list[Encoded]
    stats: dict[str, Any]


def _prepare_validation(
    section: DatasetSection,
    validation: ValidationDataset,
    tokenizer: Any,
    *,
    max_seq_length: int,
    train: list[Example],
) -> HeldOut:
    """Read, clean, render, filter and gate the validation set as the training set was.

    Examples also in the training set (by the training section's dedupe rule) are dropped as
    ``in_training_set``: a loss measured on trained examples says nothing of generalisation.
    Errors name validation_dataset.<field>; a gate failure carries this set's statistics.
    """
    vsection = validation_section(section, validation)
    with validation_scoped():
        rendered = render_dataset(vsection, tokenizer, max_seq_length=max_seq_length)
        dropped = rendered.dropped
        seen = Seen()
        dedupe(train, section.dedupe, seen=seen)  # fills ``seen`` with the training set
        fresh, repeated = dedupe(rendered.examples, section.dedupe, seen=seen)
        if repeated:
            dropped["in_training_set"] += sum(repeated.values())
        keep = {id(e) for e in fresh}
        pairs = []
        for example, item in zip(rendered.examples, rendered.items, strict=True):
            if id(example) not in keep:
                continue
            if all(label == IGNORE_INDEX for label in item.labels):
                dropped["prompt_fills_max_seq_length"] += 1
            else:
                pairs.append((example, item))
        examples, items = [e for e, _ in pairs], [i for _, i in pairs]
        stats = _validation_stats(
            validation, rendered, items=items, examples=examples, dropped=dropped
        )
        if not items:
            raise DatasetError(
                f"no validation example is left after cleaning and filters ({dict(dropped)}); "
                "in_training_set counts examples that are also in the training data: give a "
                "validation set of other examples, or use training_dataset.validation_share",
                field=VALIDATION_FIELD,
                code="dataset_empty",
            )
        try:
            enforce(
                items,
                examples,
                rendered.rules,
                max_truncated_share=section.max_truncated_share,
                max_seq_length=max_seq_length,
            )
        except DatasetGateError as exc:
            findings = inspect(
                items,
                examples,
                rendered.rules,
                max_truncated_share=section.max_truncated_share,
                max_seq_length=max_seq_length,
            )
            stats["gate"] = {
                "passed": False,
                "problem_count": len(findings),
                "problems": [asdict(f) for f in findings[:20]],
            }
            exc.dataset_stats = stats
            raise
    stats["gate"] = {"passed": True, "problem_count": 0, "problems": []}
    return HeldOut(examples=examples, items=items, stats=stats)


def _validation_stats(
    validation: ValidationDataset,
    rendered: Rendered,
    *,
    items: list[Encoded],
    examples: list[Example],
    dropped: Counter[str],
) -> dict[str, Any]:
    stats = dataset_stats(
        items=items,
        examples=examples,
        validation=0,
        rows=rendered.collected.rows,
        dropped=dropped,
        default_source=validation.name,
    )
    del stats["validation_examples"]  # this set is the validation split
    return {
        "kind": "validation_dataset",
        "source": validation.name,
        "format": rendered.collected.format,
        "layout": rendered.layout,
        **stats,
    }


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
        "system_prompt": collected.system_prompt(section.system_prompt_source),
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
