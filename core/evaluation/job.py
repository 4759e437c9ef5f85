"""A job's evaluation stage: runs evaluate() with the spec's settings and stores the result."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import core.evaluation.choice as choice
from core.data.sources import allowed_roots
from core.evaluation.run import EVALUATION_FILE, evaluate
from core.settings import Settings, get_settings
from core.spec import JobSpec


def benchmark_files(spec: JobSpec, settings: Settings) -> list[tuple[str, Path]]:
    """Each benchmark's name and file, checked (also at submit time, by core/submit.py)."""
    roots = allowed_roots(settings)
    return [
        (b.name, choice.resolve_file(b.file, roots=roots, uploads=settings.uploads_dir))
        for b in spec.evaluation.benchmarks
    ]


def dropped_held_out(stats: dict[str, Any]) -> tuple[dict[str, int], str]:
    """What the dataset filters dropped that could have been evaluated, and of what."""
    validation = stats.get("validation") or {}
    if validation.get("kind") == "validation_dataset":
        return dict(validation.get("dropped") or {}), "validation_dataset"
    return dict(stats.get("dropped") or {}), "the whole dataset, before the validation split"


def evaluate_job(
    spec: JobSpec,
    loaded: Any,
    prepared: Any,
    job_dir: Path,
    settings: Settings | None = None,
) -> str:
    """Evaluate, write evaluation.json atomically, and return the job's note."""
    settings = settings or get_settings()
    cfg = spec.evaluation
    dropped, scope = dropped_held_out(prepared.stats)
    result = evaluate(
        loaded.model,
        loaded.tokenizer,
        prepared.validation_examples,
        max_examples=cfg.max_examples,
        max_new_tokens=cfg.max_new_tokens,
        repetition_penalty=cfg.repetition_penalty,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        benchmarks=benchmark_files(spec, settings),
        max_benchmark_questions=cfg.max_benchmark_questions,
        system_prompt=spec.dataset.system_prompt,
        dropped=dropped,
    )
    result["dropped_scope"] = scope
    tmp = job_dir / f"{EVALUATION_FILE}.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, job_dir / EVALUATION_FILE)
    return note(result)


def note(result: dict[str, Any]) -> str:
    if not result["examples"]:
        return "evaluation: no held-out question/answer pairs to score (rows are ready-made texts)"
    base, tuned = result["base"]["rougeL"], result["tuned"]["rougeL"]
    diff = result["difference"]["rougeL"]
    return (
        f"evaluated on {result['examples']} held-out examples: ROUGE-L base {base:.4f}, tuned "
        f"{tuned:.4f} ({diff['verdict']}: {diff['difference']:+.4f}, 95% CI "
        f"{diff['low']:+.4f} to {diff['high']:+.4f})" + _worse_endings(result["generation"])
    )


def _worse_endings(generation: dict[str, dict[str, Any]]) -> str:
    """Say so when the tuned answers loop more, or stop on their own less often, than the base's:
    a score can rise while the answers degrade (issue #20)."""
    base, tuned = generation["base"], generation["tuned"]
    worse = []
    if _known(base, tuned, "loop_rate") and tuned["loop_rate"] > base["loop_rate"]:
        worse.append(f"loop more often than the base's ({_vs(tuned, base, 'loop_rate')})")
    if _known(base, tuned, "stop_rate") and tuned["stop_rate"] < base["stop_rate"]:
        worse.append(f"stop on their own less often ({_vs(tuned, base, 'stop_rate')})")
    if not worse:
        return ""
    # Measured on SmolLM2 (BENCHMARKS.md, issue 20): loops grew with steps and learning rate.
    return f"; tuned answers {' and '.join(worse)}: fewer steps or a lower learning_rate may help"


def _known(base: dict[str, Any], tuned: dict[str, Any], key: str) -> bool:
    return base[key] is not None and tuned[key] is not None


def _vs(tuned: dict[str, Any], base: dict[str, Any], key: str) -> str:
    return f"{tuned[key]:.1%} vs {base[key]:.1%}"
