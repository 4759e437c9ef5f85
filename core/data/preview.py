"""Render a few examples of a dataset spec, token by token, with what would be trained.

An sft preview shows each example's tokens, flagged trained or not; a dpo / orpo preview shows
each preference pair as the preference trainers take it: the prompt, the chosen and the
rejected answer, cut to the prompt and answer budgets (training_config.preference).

Runs on an inference worker (it needs a tokenizer); the API sends ``PREVIEW_TASK`` by name.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from core.data.cleaning import Seen
from core.data.gate import inspect, token_rules
from core.data.preference import EncodedPair, inspect_pairs, read_pairs
from core.data.prepare import render_dataset
from core.data.tokenize import IGNORE_INDEX, ensure_chat_template
from core.spec import DatasetSection, JobSpec
from core.spec.preference import lengths


def preview_spec(request: dict[str, Any]) -> JobSpec:
    """The job spec a preview request stands for: its base model, max_seq_length, dataset,
    method and preference budgets, the rest defaults. Raises pydantic's ValidationError where
    POST /jobs would refuse that spec (a mix or raw text for dpo, budgets above the length)."""
    return JobSpec.model_validate(
        {
            "model_config": {
                "base_model": request["base_model"],
                "max_seq_length": request["max_seq_length"],
            },
            "training_dataset": request["training_dataset"],
            "training_config": {
                "method": request.get("method", "sft"),
                "preference": request.get("preference"),
            },
        }
    )


def preview_request(request: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """A POST /datasets/preview body (as JSON) previewed for its method."""
    if request.get("method", "sft") != "sft":
        return preview_pairs(preview_spec(request), tokenizer, count=request["count"])
    section = DatasetSection.model_validate(request["training_dataset"])
    return preview(
        section, tokenizer, max_seq_length=request["max_seq_length"], count=request["count"]
    )


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


def _pair(index: int, meta: dict[str, Any], item: EncodedPair, tokenizer: Any) -> dict[str, Any]:
    return {
        "index": index,
        "meta": meta,
        # The ids the trainer gets (the prompt's end and each answer's start kept), as text.
        "prompt": tokenizer.decode(item.prompt_ids),
        "chosen": tokenizer.decode(item.chosen_ids),
        "rejected": tokenizer.decode(item.rejected_ids),
        "prompt_tokens": len(item.prompt_ids),
        "chosen_tokens": len(item.chosen_ids),
        "rejected_tokens": len(item.rejected_ids),
        "prompt_length": item.prompt_length,
        "chosen_length": item.chosen_length,
        "rejected_length": item.rejected_length,
        "truncated": item.cut is not None,
        "cut_by": item.cut,
    }


def preview_pairs(spec: JobSpec, tokenizer: Any, *, count: int) -> dict[str, Any]:
    """The first ``count`` preference pairs of a dpo / orpo job's dataset, as its trainer takes
    them, with the gate's findings on them (listed, not raised).

    Rows that are not preference pairs raise DatasetError dataset_not_preference, as the job
    would fail with.
    """
    section = spec.dataset
    template = ensure_chat_template(tokenizer, section.chat_template)
    rules = token_rules(tokenizer)
    found = read_pairs(section, tokenizer, spec, seen=Seen(), limit=count)
    findings = inspect_pairs(
        found.items, found.pairs, rules, max_truncated_share=section.max_truncated_share
    )
    prompt_budget, answer_budget = lengths(spec.training.preference, spec.model.max_seq_length)
    return {
        "method": spec.training.method,
        "format": found.format,
        "layout": found.layout,
        "chat_template": template,
        "end_of_turn_token": rules.eot_token,
        "dropped": dict(found.dropped),
        "max_prompt_length": prompt_budget,
        "max_completion_length": answer_budget,
        "examples": [],
        "pairs": [
            _pair(index, pair.meta, item, tokenizer)
            for index, (pair, item) in enumerate(zip(found.pairs, found.items, strict=True))
        ],
        "problems": [asdict(f) for f in findings],
    }
