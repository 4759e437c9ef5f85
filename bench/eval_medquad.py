"""Does tuning help? SmolLM2-135M on MedQuAD pairs, scored on held-out pairs of the same kinds.

Runs the worker's own pipeline in-process (SQLite, no queue) on this CPU: prepare a MedQuAD
collection, hold out a seed-stable validation share, train LoRA, then answer the held-out
questions with the base model and the tuned adapter and score both (ROUGE, BLEU).

    python bench/eval_medquad.py [MEDQUAD_COLLECTION_DIR] [OUT.json]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from core.evaluation import EVALUATION_FILE
from core.pipeline import run_job
from core.settings import Settings
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.migrate import upgrade

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "medquad" / "5_NIDDK_QA"


def spec(data: Path) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model_config": {
                "base_model": "smollm2-135m-instruct",
                "finetuned_model": "smollm2-medquad",
                "max_seq_length": 320,
                "load_in_4bit": False,
            },
            "lora_config": {"r": 16, "lora_alpha": 32, "use_gradient_checkpointing": False},
            "training_dataset": {
                "name": str(data),
                "max_tokens": 256,
                "validation_share": 0.1,
                "validation_seed": 7,
            },
            "training_config": {
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 1,
                "max_steps": 80,
                "warmup_steps": 5,
                "learning_rate": 5e-4,
                "optim": "adamw_torch",
                "save_steps": 0,
                "seed": 42,
            },
            "evaluation_config": {"enabled": True, "max_examples": 20, "max_new_tokens": 80},
        }
    )


def main(data: Path, out: Path) -> None:
    # The worker reads datasets only from allowed folders: allow the corpus's.
    os.environ["MEDTUNE_DATA_ROOTS"] = json.dumps([str(data.resolve().parent)])
    home = Path(tempfile.mkdtemp(prefix="medtune-eval-"))
    settings = Settings(home=home, model_cache=ROOT / ".medtune" / "models")
    upgrade(settings.db_url)
    job_spec = spec(data)
    with session_scope(settings.db_url) as s:
        job_id = jobs.create_job(s, job_spec).id
    started = time.time()
    status = run_job(job_id, settings, worker="bench")
    wall = time.time() - started
    with session_scope(settings.db_url) as s:
        job = jobs.get_job(s, job_id)
    result = json.loads((home / "jobs" / job_id / EVALUATION_FILE).read_text())
    summary = {
        "status": status,
        "wall_s": round(wall, 1),
        "data": str(data),
        "train_examples": (job.dataset_stats or {}).get("examples"),
        "held_out": (job.dataset_stats or {}).get("validation_examples"),
        "steps": job.steps_done,
        "spec": job_spec.to_json(),
        "base": result["base"],
        "tuned": result["tuned"],
        "meteor_note": result["meteor_note"],
        "answers": result["answers"][:3],
    }
    out.write_text(json.dumps(summary, indent=2))
    print(
        json.dumps(
            {
                k: summary[k]
                for k in (
                    "status",
                    "wall_s",
                    "train_examples",
                    "held_out",
                    "steps",
                    "base",
                    "tuned",
                )
            }
        )
    )


if __name__ == "__main__":
    main(
        Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DATA,
        Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "bench/results/eval-medquad-cpu.json",
    )
