"""``medtune jobs evaluation JOB``: base vs tuned as tables, each score with its interval."""

from __future__ import annotations

import argparse
from typing import Any

from cli.client import MedtuneClient
from cli.output import bind, print_json, table

METRICS = ("rougeL", "rouge1", "rouge2", "meteor", "bleu")
GENERATION = ("stop_rate", "mean_tokens", "loop_rate", "repeated_4gram")


def _interval(diff: dict[str, Any] | None) -> tuple[Any, Any, Any]:
    if not diff:
        return None, None, None
    return f"{diff['difference']:+g}", f"{diff['low']:+g} .. {diff['high']:+g}", diff["verdict"]


def evaluation_text(result: dict[str, Any]) -> str:
    differences = result.get("difference") or {}
    scores = [
        (
            name,
            result["base"].get(name),
            result["tuned"].get(name),
            *_interval(differences.get(name)),
        )
        for name in METRICS
        if result["base"].get(name) is not None
    ]
    parts = [
        f"{result['examples']} held-out questions (of {result.get('held_out_examples', '?')}), "
        f"greedy, {result['decoding']['max_new_tokens']} new tokens at most",
        table(scores, ("SCORE", "BASE", "TUNED", "TUNED-BASE", "95% CI", "VERDICT")),
    ]
    generation = result.get("generation")
    if generation:
        rows = [(name, generation["base"][name], generation["tuned"][name]) for name in GENERATION]
        parts.append(table(rows, ("ANSWERS", "BASE", "TUNED")))
    benches = [
        (
            b["name"],
            b["questions"],
            b["base_accuracy"],
            b["tuned_accuracy"],
            *_interval(b["difference"]),
        )
        for b in result.get("benchmarks") or []
    ]
    if benches:
        headers = (
            "BENCHMARK",
            "QUESTIONS",
            "BASE ACC",
            "TUNED ACC",
            "TUNED-BASE",
            "95% CI",
            "VERDICT",
        )
        parts.append(table(benches, headers))
    if result.get("meteor_note"):
        parts.append(result["meteor_note"])
    return "\n\n".join(parts)


def cmd_evaluation(args: argparse.Namespace, client: MedtuneClient) -> int:
    result = client.get_evaluation(args.job_id)
    if args.json:
        print_json(result)
    else:
        print(evaluation_text(result))
    return 0


def register(jobs_sub: Any, common: argparse.ArgumentParser) -> None:
    evaluation = jobs_sub.add_parser(
        "evaluation", parents=[common], help="base vs tuned scores with 95%% intervals"
    )
    evaluation.add_argument("job_id")
    evaluation.set_defaults(func=bind(cmd_evaluation))
