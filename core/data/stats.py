"""Dataset statistics stored on the job (``job.dataset_stats``) and shown by the API."""

from __future__ import annotations

from collections import Counter
from typing import Any

from core.data.example import Example
from core.data.tokenize import IGNORE_INDEX, Encoded


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0
    rank = max(1, min(len(sorted_values), -(-len(sorted_values) * q // 100)))
    return sorted_values[int(rank) - 1]


def dataset_stats(
    *,
    items: list[Encoded],
    examples: list[Example],
    validation: int,
    rows: int,
    dropped: Counter[str],
    default_source: str,
) -> dict[str, Any]:
    """Counts by source and question type, drops by reason, token lengths, trained share.

    Lengths are before truncation, so p99 above max_seq_length shows how much is cut.
    """
    lengths = sorted(i.length or len(i.input_ids) for i in items)
    tokens = sum(len(i.input_ids) for i in items)
    trained = sum(1 for i in items for label in i.labels if label != IGNORE_INDEX)
    truncated = sum(i.truncated for i in items)
    # MedQuAD rows name their collection; a mix tags each example with its dataset.
    by_source = Counter(
        str(e.meta.get("source") or e.meta.get("dataset") or default_source) for e in examples
    )
    by_qtype = Counter(str(e.meta["qtype"]) for e in examples if e.meta.get("qtype"))
    stats: dict[str, Any] = {
        "rows": rows,
        "examples": len(items),
        "validation_examples": validation,
        "by_source": dict(by_source.most_common()),
        "dropped": dict(dropped.most_common()),
        "dropped_total": sum(dropped.values()),
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_token_share": round(trained / tokens, 4) if tokens else 0.0,
        "truncated": truncated,
        "truncation_rate": round(truncated / len(items), 4) if items else 0.0,
        "length_p50": percentile(lengths, 50),
        "length_p90": percentile(lengths, 90),
        "length_p99": percentile(lengths, 99),
        "length_max": lengths[-1] if lengths else 0,
    }
    if by_qtype:
        stats["by_qtype"] = dict(by_qtype.most_common())
    return stats
