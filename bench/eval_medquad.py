"""Does tuning help on questions from sources it never trained on? (issues #18 and #20)

Runs the worker's own pipeline in-process (SQLite, no queue) on this CPU: SmolLM2-135M tuned
with LoRA on some MedQuAD collections (a mix), evaluated by the service itself on a collection
it never saw (``validation_dataset``): ROUGE / BLEU / METEOR with paired 95% bootstrap
intervals and verdicts, stop / length / loop rates of base and tuned, and the shipped
multiple-choice sample. The figures in BENCHMARKS.md come from this script's JSON.

    python bench/eval_medquad.py --train 3_GHR_QA 5_NIDDK_QA 6_NINDS_QA \
        --held-out 4_MPlus_Health_Topics_QA --steps 60 --lr 5e-4 --out bench/results/x.json
    python bench/eval_medquad.py --train-file ../shared/data/seed_short/... --held-out ...
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from core.evaluation import EVALUATION_FILE
from core.pipeline import run_job
from core.settings import Settings
from core.spec import DEFAULT_REPETITION_PENALTY, JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.migrate import upgrade

ROOT = Path(__file__).resolve().parents[1]
MEDQUAD = ROOT.parent / "shared" / "data" / "medquad"


def job_spec(args: argparse.Namespace) -> dict[str, Any]:
    if args.train_file:
        dataset: dict[str, Any] = {"name": str(Path(args.train_file).resolve())}
    else:
        per_source = args.train_rows // len(args.train)
        dataset = {
            "sources": [
                {"name": str(MEDQUAD / name), "max_samples": per_source} for name in args.train
            ],
            "mix_seed": args.seed,
        }
    return {
        "model_config": {
            "base_model": "smollm2-135m-instruct",
            "finetuned_model": "smollm2-medquad-heldout",
            "max_seq_length": args.max_seq_length,
            "load_in_4bit": False,
        },
        "lora_config": {
            "r": 16,
            "lora_alpha": 16,
            "lora_dropout": args.lora_dropout,
            "use_gradient_checkpointing": False,
        },
        "training_dataset": {
            **dataset,
            "max_tokens": args.max_tokens,
            "validation_share": 0,
            "drop_looping_answers": not args.keep_looping_answers,
        },
        "validation_dataset": {
            "name": str(MEDQUAD / args.held_out),
            "max_samples": args.held_out_rows,
        },
        "training_config": {
            "per_device_train_batch_size": args.train_batch_size,
            "gradient_accumulation_steps": 1,
            "max_steps": args.steps,
            "warmup_steps": 5,
            "learning_rate": args.lr,
            "optim": "adamw_torch",
            "save_steps": 0,
            "eval_strategy": "end",
            "eval_max_examples": args.eval_loss_examples or None,
            "seed": args.seed,
        },
        "evaluation_config": {
            "enabled": True,
            "max_examples": args.questions,
            "max_new_tokens": args.max_new_tokens,
            "repetition_penalty": args.repetition_penalty,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "benchmarks": [{"name": "medical_mcq_sample", "file": "sample:medical_mcq"}],
        },
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    # The worker reads datasets only from allowed folders: allow the corpus's and the file's.
    roots = [str(MEDQUAD)] + (
        [str(Path(args.train_file).resolve().parent)] if args.train_file else []
    )
    os.environ["MEDTUNE_DATA_ROOTS"] = json.dumps(roots)
    home = Path(tempfile.mkdtemp(prefix="medtune-eval-"))
    settings = Settings(home=home, model_cache=ROOT / ".medtune" / "models")
    upgrade(settings.db_url)
    spec = JobSpec.model_validate(job_spec(args))
    with session_scope(settings.db_url) as s:
        job_id = jobs.create_job(s, spec).id
    started = time.time()
    status = run_job(job_id, settings, worker="bench")
    wall = time.time() - started
    with session_scope(settings.db_url) as s:
        job = jobs.get_job(s, job_id)
        rows, _ = jobs.metrics_page(s, job_id, after_step=-1, limit=100_000)
        eval_loss = {r.step: r.eval_loss for r in rows if r.eval_loss is not None}
    result = json.loads((home / "jobs" / job_id / EVALUATION_FILE).read_text())
    stats = job.dataset_stats or {}
    return {
        "status": status,
        "wall_s": round(wall, 1),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "train": args.train_file or args.train,
        "held_out": args.held_out,
        "train_examples": stats.get("examples"),
        "validation_examples": stats.get("validation_examples"),
        "steps": job.steps_done,
        "stage_seconds": getattr(job, "stage_seconds", None),
        "eval_loss": eval_loss,  # step -> held-out loss; step 0 is the base model's
        "notes": job.notes,
        "spec": spec.to_json(),
        **{k: v for k, v in result.items() if k != "answers"},
        "answers": result["answers"][:4],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", nargs="+", default=["3_GHR_QA", "5_NIDDK_QA", "6_NINDS_QA"])
    parser.add_argument("--train-file", help="a JSONL training file instead of collections")
    parser.add_argument("--train-rows", type=int, default=900)
    parser.add_argument("--held-out", default="4_MPlus_Health_Topics_QA")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--train-batch-size", type=int, default=4, help="examples a step")
    parser.add_argument("--max-seq-length", type=int, default=384)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--held-out-rows", type=int, default=400, help="rows read from it")
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repetition-penalty", type=float, default=DEFAULT_REPETITION_PENALTY)
    parser.add_argument(
        "--batch-size", type=int, default=16, help="questions answered in one generate call"
    )
    parser.add_argument(
        "--eval-loss-examples",
        type=int,
        default=200,
        help="held-out examples the eval loss is measured on (a seeded sample); 0: all",
    )
    parser.add_argument(
        "--keep-looping-answers",
        action="store_true",
        help="train on answers that loop too (drop_looping_answers false, as before session 8)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/eval-heldout-cpu.json")
    args = parser.parse_args()
    summary = run(args)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    keys = ("status", "wall_s", "train_examples", "validation_examples", "steps", "base", "tuned")
    print(json.dumps({k: summary[k] for k in keys}))
    print(json.dumps({"difference": summary["difference"], "generation": summary["generation"]}))


if __name__ == "__main__":
    main()
