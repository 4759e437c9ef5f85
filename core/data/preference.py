"""The data stage of a preference job (dpo, orpo): load, pair, dedupe, render, tokenize, gate,
split.

Each pair is rendered through the chat template as two conversations, the prompt followed by
the chosen answer and by the rejected one; the answer's tokens (end-of-turn token included)
are what the preference loss scores, the prompt's are shared. The gate checks both
conversations as it checks SFT examples (BOS, the answer closed by the end-of-turn token) and
counts pairs cut by the prompt or answer budget (training_config.preference).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from core.data.cleaning import Seen, dedupe, validation_split
from core.data.gate import DatasetGateError, Finding, TokenRules, check_example, token_rules
from core.data.preference_rows import Pair, to_pairs
from core.data.prepare import Prepared, prepare
from core.data.prepare import _check_enough as check_enough
from core.data.sources import load
from core.data.stats import percentile
from core.data.tokenize import Encoded, encode, ensure_chat_template
from core.data.validation import FIELD as VALIDATION_FIELD
from core.data.validation import scoped as validation_scoped
from core.data.validation import validation_section
from core.errors import DatasetError
from core.spec import DatasetSection, JobSpec
from core.spec.preference import lengths

PROMPT_FIELD = "training_config.preference.max_prompt_length"
ANSWER_FIELD = "training_config.preference.max_completion_length"


@dataclass
class EncodedPair:
    """Token ids as the preference trainers take them (cut to the budgets), and the whole
    conversations for the gate."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen: Encoded = field(repr=False)  # prompt + chosen answer, uncut
    rejected: Encoded = field(repr=False)
    prompt_length: int = 0  # tokens before the cut
    chosen_length: int = 0
    rejected_length: int = 0
    cut: str | None = None  # the budget that cut it: PROMPT_FIELD, ANSWER_FIELD or None

    def features(self) -> dict[str, list[int]]:
        return {
            "prompt_ids": self.prompt_ids,
            "chosen_ids": self.chosen_ids,
            "rejected_ids": self.rejected_ids,
        }


@dataclass
class PreparedPairs:
    """What core.data.prepare.Prepared holds for an SFT job, for a preference job: the pairs,
    and each pair's prompt with its chosen answer as the Example evaluation asks."""

    train: list[EncodedPair]
    validation: list[EncodedPair]
    examples: list[Any]
    validation_examples: list[Any] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


def _last_answer(item: Encoded) -> Encoded:
    """The encoding with only its final answer as an answer span: earlier assistant turns are
    part of the prompt."""
    item.answer_spans = item.answer_spans[-1:]
    return item


def encode_pair(
    tokenizer: Any, pair: Pair, *, prompt_budget: int, answer_budget: int
) -> EncodedPair:
    whole = 1 << 30  # cut here by the budgets, not by encode's max_length
    chosen = _last_answer(encode(tokenizer, pair.as_example(), max_length=whole))
    rejected_example = pair.as_example()
    rejected_example.messages[-1] = {"role": "assistant", "content": pair.rejected}  # type: ignore[index]
    rejected = _last_answer(encode(tokenizer, rejected_example, max_length=whole))
    start, end = chosen.answer_spans[0]
    r_start, r_end = rejected.answer_spans[0]
    prompt = chosen.full_ids[:start]
    chosen_ids, rejected_ids = chosen.full_ids[start:end], rejected.full_ids[r_start:r_end]
    cut = None
    if len(prompt) > prompt_budget:
        cut = PROMPT_FIELD
    elif max(len(chosen_ids), len(rejected_ids)) > answer_budget:
        cut = ANSWER_FIELD
    return EncodedPair(
        # The prompt keeps its end (the question), an answer its start.
        prompt_ids=prompt[-prompt_budget:],
        chosen_ids=chosen_ids[:answer_budget],
        rejected_ids=rejected_ids[:answer_budget],
        chosen=chosen,
        rejected=rejected,
        prompt_length=len(prompt),
        chosen_length=len(chosen_ids),
        rejected_length=len(rejected_ids),
        cut=cut,
    )


def inspect_pairs(
    items: list[EncodedPair],
    pairs: list[Pair],
    rules: TokenRules,
    *,
    max_truncated_share: float,
    first_only: bool = False,
) -> list[Finding]:
    """The gate's findings: each conversation checked as an SFT example, then truncation."""
    findings = []
    for index, (item, pair) in enumerate(zip(items, pairs, strict=True)):
        example = pair.as_example()
        for encoded in (item.chosen, item.rejected):
            found = check_example(index, encoded, example, rules)
            if found:
                findings.append(found)
                if first_only:
                    return findings
                break
    cut = [i for i, item in enumerate(items) if item.cut]
    if items and len(cut) / len(items) > max_truncated_share:
        first = items[cut[0]]
        findings.append(
            Finding(
                "too_many_truncated",
                f"{len(cut)} of {len(items)} preference pairs ({len(cut) / len(items):.1%}) are "
                f"cut by the prompt or answer budget, above max_truncated_share "
                f"{max_truncated_share:.1%}; the first is pair {cut[0]} (row "
                f"{pairs[cut[0]].meta.get('row')}: prompt {first.prompt_length}, chosen "
                f"{first.chosen_length}, rejected {first.rejected_length} tokens). Raise "
                f"{first.cut} (and model_config.max_seq_length), or raise "
                "training_dataset.max_truncated_share",
                cut[0],
                first.cut or PROMPT_FIELD,
            )
        )
    return findings


@dataclass
class _Set:
    """One dataset read as pairs: the pairs kept, their encodings (parallel), and counts."""

    pairs: list[Pair]
    items: list[EncodedPair]
    rows: int
    layout: str
    format: str
    dropped: Counter[str]
    system_from: Counter[str]


def read_pairs(
    section: DatasetSection, tokenizer: Any, spec: JobSpec, *, seen: Seen, limit: int | None = None
) -> _Set:
    """Load, pair, dedupe and encode one dataset (the training or the validation set); with
    ``limit`` (a preview), only the first pairs kept are encoded."""
    loaded = load(section)
    converted = to_pairs(
        loaded.rows,
        system_prompt=section.system_prompt,
        system_prompt_source=section.system_prompt_source,
    )
    keys = [p.dedupe_key() for p in converted.pairs]
    kept = {id(k) for k in dedupe(keys, section.dedupe, seen=seen)[0]}
    duplicates = len(keys) - len(kept)
    pairs = [p for p, k in zip(converted.pairs, keys, strict=True) if id(k) in kept][:limit]
    prompt_budget, answer_budget = lengths(spec.training.preference, spec.model.max_seq_length)
    items = [
        encode_pair(tokenizer, p, prompt_budget=prompt_budget, answer_budget=answer_budget)
        for p in pairs
    ]
    dropped = loaded.dropped + converted.dropped
    if duplicates:
        dropped["duplicate"] += duplicates
    rows = len(loaded.rows) + sum(loaded.dropped.values())
    return _Set(pairs, items, rows, converted.layout, loaded.format, dropped, converted.system_from)


def _gate(found: _Set, rules: TokenRules, section: DatasetSection, stats: dict[str, Any]) -> None:
    findings = inspect_pairs(
        found.items, found.pairs, rules, max_truncated_share=section.max_truncated_share
    )
    stats["gate"] = {
        "passed": not findings,
        "problem_count": len(findings),
        "problems": [asdict(f) for f in findings[:20]],
    }
    if findings:
        error = findings[0].error()
        error.dataset_stats = stats
        raise error


def pair_stats(found: _Set, *, source: str) -> dict[str, Any]:
    """Rows, drops and token lengths (before the cut) of a set of pairs."""
    items = found.items

    def spread(name: str, values: list[int]) -> dict[str, int]:
        ordered = sorted(values)
        return {
            f"{name}_p50": percentile(ordered, 50),
            f"{name}_p90": percentile(ordered, 90),
            f"{name}_max": ordered[-1] if ordered else 0,
        }

    return {
        "source": source,
        "format": found.format,
        "layout": found.layout,
        "rows": found.rows,
        "examples": len(items),
        "dropped": dict(found.dropped.most_common()),
        "dropped_total": sum(found.dropped.values()),
        "system_prompt": {k: found.system_from[k] for k in ("row", "job", "none")},
        # The tokens the preference loss scores: both answers of every pair.
        "trained_tokens": sum(len(i.chosen_ids) + len(i.rejected_ids) for i in items),
        "truncated": sum(1 for i in items if i.cut),
        **spread("prompt_length", [i.prompt_length for i in items]),
        **spread("chosen_length", [i.chosen_length for i in items]),
        **spread("rejected_length", [i.rejected_length for i in items]),
    }


Held = list[tuple[Pair, EncodedPair]]


def _share_split(found: _Set, section: DatasetSection) -> tuple[Held, Held]:
    """validation_share of the pairs held out, by the seeded hash SFT examples are split by."""
    keys = [p.dedupe_key() for p in found.pairs]
    at = {id(k): i for i, k in enumerate(keys)}
    train, held = validation_split(
        keys, share=section.validation_share, seed=section.validation_seed
    )
    whole = list(zip(found.pairs, found.items, strict=True))
    return [whole[at[id(k)]] for k in train], [whole[at[id(k)]] for k in held]


def _validation_set(
    spec: JobSpec, tokenizer: Any, *, seen: Seen, rules: TokenRules
) -> tuple[Held, dict[str, Any]]:
    """The validation_dataset's pairs (those also in the training set dropped), gated."""
    assert spec.validation_dataset is not None
    section = validation_section(spec.dataset, spec.validation_dataset)
    with validation_scoped():
        found = read_pairs(section, tokenizer, spec, seen=seen)
        stats = {"kind": "validation_dataset", **pair_stats(found, source=section.name)}
        if not found.items:
            raise DatasetError(
                f"no validation pair is left ({dict(found.dropped)}); 'duplicate' counts pairs "
                "also in the training data: give other pairs, or use "
                "training_dataset.validation_share",
                field=VALIDATION_FIELD,
                code="dataset_empty",
            )
        _gate(found, rules, spec.dataset, stats)
    return list(zip(found.pairs, found.items, strict=True)), stats


def prepare_pairs(spec: JobSpec, tokenizer: Any) -> PreparedPairs:
    """Everything before a preference job trains. Raises DatasetError (code
    dataset_not_preference) when the rows are not preference pairs, and DatasetGateError with
    the statistics on the first pair at fault."""
    section = spec.dataset
    template = ensure_chat_template(tokenizer, section.chat_template)
    rules = token_rules(tokenizer)
    seen = Seen()
    found = read_pairs(section, tokenizer, spec, seen=seen)
    prompt_budget, answer_budget = lengths(spec.training.preference, spec.model.max_seq_length)
    stats: dict[str, Any] = {
        "method": spec.training.method,
        "chat_template": template,
        "max_seq_length": spec.model.max_seq_length,
        "max_prompt_length": prompt_budget,
        "max_completion_length": answer_budget,
        **pair_stats(found, source=section.name),
    }
    _gate(found, rules, section, stats)
    if spec.validation_dataset is None:
        train, held = _share_split(found, section)
        stats["validation"] = (
            {"kind": "validation_share", "share": section.validation_share, "examples": len(held)}
            if held
            else None
        )
    else:
        train = list(zip(found.pairs, found.items, strict=True))
        try:
            held, stats["validation"] = _validation_set(spec, tokenizer, seen=seen, rules=rules)
        except DatasetGateError as exc:
            stats["validation"], exc.dataset_stats = exc.dataset_stats, stats
            raise
    stats["examples"], stats["validation_examples"] = len(train), len(held)
    check_enough(section, len(train), stats)
    return PreparedPairs(
        train=[item for _, item in train],
        validation=[item for _, item in held],
        examples=[pair.as_example() for pair, _ in train],
        validation_examples=[pair.as_example() for pair, _ in held],
        stats=stats,
    )


def prepare_job(spec: JobSpec, tokenizer: Any) -> Prepared | PreparedPairs:
    """A job's data stage by its method: SFT examples (core.data.prepare) or preference pairs."""
    if spec.training.method == "sft":
        return prepare(
            spec.dataset,
            tokenizer,
            max_seq_length=spec.model.max_seq_length,
            validation=spec.validation_dataset,
        )
    return prepare_pairs(spec, tokenizer)
