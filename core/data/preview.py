"""Render a few examples of a dataset spec, token by token, with what would be trained.

Runs on an inference worker (it needs a tokenizer); the API sends ``PREVIEW_TASK`` by name.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from core.data.gate import inspect
from core.data.prepare import render_dataset
from core.data.tokenize import IGNORE_INDEX
from core.spec import DatasetSection


def preview(
    section: DatasetSection, tokenizer: Any, *, max_seq_length: int, count: int
) -> dict[str, Any]:
    """The first ``count`` cleaned examples, rendered, with per-token trained flags.

    Gate findings on those examples are listed, not raised, so a bad template can be seen.
    """
    rendered = render_dataset(section, tokenizer, max_seq_length=max_seq_length, limit=count)
    findings = inspect(
        rendered.items,
        rendered.examples,
        rendered.rules,
        max_truncated_share=section.max_truncated_share,
        max_seq_length=max_seq_length,
    )
    examples = []
    for index, (example, item) in enumerate(zip(rendered.examples, rendered.items, strict=True)):
        pieces = tokenizer.convert_ids_to_tokens(item.input_ids)
        examples.append(
            {
                "index": index,
                "meta": example.meta,
                "text": tokenizer.decode(item.input_ids),
                "length": item.length,
                "truncated": item.truncated,
                "trained_tokens": sum(label != IGNORE_INDEX for label in item.labels),
                "tokens": [
                    {"id": tok, "piece": piece, "trained": label != IGNORE_INDEX}
                    for tok, piece, label in zip(item.input_ids, pieces, item.labels, strict=True)
                ],
            }
        )
    return {
        "format": rendered.collected.format,
        "layout": rendered.layout,
        "chat_template": rendered.template,
        "end_of_turn_token": rendered.rules.eot_token,
        "dropped": dict(rendered.dropped),
        "examples": examples,
        "problems": [asdict(f) for f in findings],
    }
