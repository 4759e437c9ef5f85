"""A finished job as a worker leaves it, for client-side tests (README, CLI, dashboard): metric
rows, an adapter folder, ``evaluation.json`` and an ``artifacts.json`` with real files."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from core.evaluation.run import EVALUATION_FILE
from core.evaluation.sanity import generation_stats
from core.export.formats import describe, update_manifest
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus

QUESTIONS = [f"What helps with symptom {i}?" for i in range(12)]
REFERENCES = [f"Rest, fluids and a doctor's visit help with symptom {i}." for i in range(12)]
BASE = [f"Symptom {i} is a condition that can be a condition that can be" for i in range(12)]
TUNED = [f"Rest, fluids and a doctor's visit help symptom {i}." for i in range(12)]


def evaluation_result() -> dict[str, Any]:
    """What core.evaluation.run.evaluate stores for fixed answers."""
    answers = [
        {
            "question": q,
            "reference": r,
            "base": b,
            "tuned": t,
            "base_stopped": False,
            "tuned_stopped": True,
            "base_tokens": 64,
            "tuned_tokens": 14,
        }
        for q, r, b, t in zip(QUESTIONS, REFERENCES, BASE, TUNED, strict=True)
    ]
    return {
        "examples": len(answers),
        "held_out_examples": 16,
        "dropped_before_evaluation": {},
        "decoding": {"greedy": True, "max_new_tokens": 64},
        "sampling": {"seed": 0, "distinct_questions": True},
        # What core.evaluation.run.compare gives for these answers (scoring them takes ~13 s).
        "base": {
            "rouge1": 0.2145,
            "rouge2": 0.0312,
            "rougeL": 0.2067,
            "meteor": 0.1934,
            "bleu": 2.41,
        },
        "tuned": {
            "rouge1": 0.9412,
            "rouge2": 0.875,
            "rougeL": 0.9412,
            "meteor": 0.9121,
            "bleu": 79.3,
        },
        "difference": {
            name: {"difference": d, "low": lo, "high": hi, "confidence": 0.95, "verdict": "better"}
            for name, d, lo, hi in [
                ("rouge1", 0.7267, 0.69, 0.76),
                ("rouge2", 0.8438, 0.8, 0.88),
                ("rougeL", 0.7345, 0.7, 0.77),
                ("meteor", 0.7187, 0.68, 0.75),
                ("bleu", 76.89, 70.1, 82.5),
            ]
        },
        "generation": {
            name: generation_stats(
                [
                    {
                        "answer": a[name],
                        "stopped": a[f"{name}_stopped"],
                        "tokens": a[f"{name}_tokens"],
                    }
                    for a in answers
                ]
            )
            for name in ("base", "tuned")
        },
        "benchmarks": [
            {
                "name": "mcq",
                "questions": 20,
                "dropped": {},
                "base_accuracy": 0.35,
                "tuned_accuracy": 0.5,
                "difference": {
                    "difference": 0.15,
                    "low": -0.05,
                    "high": 0.35,
                    "confidence": 0.95,
                    "verdict": "no measurable difference",
                },
            }
        ],
        "meteor_note": None,
        "answers": answers,
    }


SMOKE = [
    {"question": "What is high blood pressure?", "answer": "Blood pressure above 130/80.",
     "stopped": True, "tokens": 9},
    {"question": "How is type 2 diabetes treated?", "answer": "Diet, exercise and metformin.",
     "stopped": True, "tokens": 8},
]  # fmt: skip


def write_artifacts(job_dir: Path) -> dict[str, Any]:
    """The manifest of a ``lora`` and a ``gguf_q4_k_m`` export, with their files on disk."""
    adapter = job_dir / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_text('{"r": 16}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    gguf = job_dir / "gguf"
    gguf.mkdir(exist_ok=True)
    (gguf / "model-q4_k_m.gguf").write_bytes(b"GGUF" + b"\1" * 8192)
    return update_manifest(
        job_dir,
        {
            "lora": {"status": "ok", "folder": "adapter", "files": describe(adapter),
                     "smoke_test": SMOKE},
            "gguf_q4_k_m": {"status": "ok", "folder": "gguf",
                            "files": describe(gguf), "smoke_test": SMOKE},
            "merged_4bit": {"status": "failed", "error": {"code": "export_requires_cuda",
                            "message": "bitsandbytes 4-bit needs CUDA here"}},
        },
    )  # fmt: skip


def metric_rows(steps: int, *, start: datetime, seconds_per_step: float = 2.0) -> list[dict]:
    """Training rows with falling loss, an eval loss every 5 steps, throughput and memory."""
    rows = []
    for step in range(1, steps + 1):
        row: dict[str, Any] = {
            "step": step,
            "loss": round(2.5 / (1 + 0.1 * step), 4),
            "learning_rate": 2e-4 * (1 - step / (steps + 1)),
            "grad_norm": 1.0,
            "epoch": step / steps,
            "tokens_per_second": 240.0 + step,
            "samples_per_second": 1.5,
            "memory_mb": 900.0 + step,
            "peak_memory_mb": 950.0 + step,
            "created_at": start + timedelta(seconds=seconds_per_step * step),
        }
        if step % 5 == 0:
            row["eval_loss"] = round(2.6 / (1 + 0.08 * step), 4)
        rows.append(row)
    return rows


def finish_job(
    db_url: str, home: Path, job_id: str, *, steps: int = 20, pause_s: float = 0.0
) -> Path:
    """Claim, log ``steps`` rows, write the adapter, evaluation and artifacts, and succeed."""
    job_dir = home / "jobs" / job_id
    job_dir.mkdir(parents=True, exist_ok=True)
    write_artifacts(job_dir)
    (job_dir / EVALUATION_FILE).write_text(json.dumps(evaluation_result()))
    start = datetime.now(UTC) - timedelta(minutes=5)
    with session_scope(db_url) as s:
        assert jobs.claim(s, job_id, worker="test")
        jobs.set_fields(s, job_id, steps_total=steps, stage="training")
    time.sleep(pause_s)  # a watcher sees the job training before its rows arrive
    with session_scope(db_url) as s:
        jobs.add_metrics(s, job_id, metric_rows(steps, start=start))
        jobs.finish(
            s,
            job_id,
            JobStatus.succeeded,
            adapter_dir=str(job_dir / "adapter"),
            artifacts_dir=str(job_dir),
        )
    return job_dir
