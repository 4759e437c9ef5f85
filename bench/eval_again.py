"""Evaluate a finished bench job again with other decoding settings, without training it again.

bench/eval_medquad.py trains and evaluates in one job (about an hour on the 2-core CPU); the
decoding of the evaluation (repetition_penalty, max_new_tokens), its number of questions
(max_examples) and how many it answers at once (batch_size) are cheaper to vary.
This loads the job's base and adapter, prepares its data as the job did, and runs the service's
own evaluation stage (core.evaluation.job.evaluate_job) with the changed settings:

    python bench/eval_again.py /tmp/medtune-eval-XXXX --repetition-penalty 1.1 \
        --out bench/results/eval-heldout-rp1.1.json

``--adapter-scale`` weighs the adapter's update (lora_alpha times the scale, in a copy of the
adapter): 0 is the base, 1 the tuned model, between them a blend of the two (WiSE-FT).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from core.base_models import resolve
from core.data.prepare import prepare
from core.evaluation import EVALUATION_FILE
from core.evaluation.job import evaluate_job
from core.settings import Settings
from core.spec import DEFAULT_REPETITION_PENALTY, JobSpec
from core.training import engines

ROOT = Path(__file__).resolve().parents[1]


def job_folder(home: Path) -> Path:
    folders = [p for p in (home / "jobs").iterdir() if (p / "adapter").is_dir()]
    if len(folders) != 1:
        raise SystemExit(f"{home}/jobs: expected one finished job, found {len(folders)}")
    return folders[0]


def scaled_adapter(adapter: Path, scale: float) -> Path:
    """A copy of ``adapter`` whose update weighs ``scale`` times as much (peft multiplies
    each LoRA delta by lora_alpha / r)."""
    copy = Path(tempfile.mkdtemp(prefix="medtune-scaled-")) / "adapter"
    shutil.copytree(adapter, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["lora_alpha"] = config["lora_alpha"] * scale
    (copy / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return copy


def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = job_folder(args.home)
    adapter = folder / "adapter"
    if args.adapter_scale != 1:
        adapter = scaled_adapter(adapter, args.adapter_scale)
    raw = json.loads((folder / "spec.json").read_text())
    raw["evaluation_config"]["repetition_penalty"] = args.repetition_penalty
    if args.max_new_tokens:
        raw["evaluation_config"]["max_new_tokens"] = args.max_new_tokens
    if args.max_examples:
        raw["evaluation_config"]["max_examples"] = args.max_examples
    if args.batch_size:
        raw["evaluation_config"]["batch_size"] = args.batch_size
    roots = {str(Path(s["name"]).parent) for s in raw["training_dataset"].get("sources") or []}
    roots |= {str(Path(raw["validation_dataset"]["name"]).parent)}
    if raw["training_dataset"].get("name"):
        roots.add(str(Path(raw["training_dataset"]["name"]).parent))
    os.environ["MEDTUNE_DATA_ROOTS"] = json.dumps(sorted(roots))
    spec = JobSpec.model_validate(raw)
    settings = Settings(
        home=Path(tempfile.mkdtemp(prefix="medtune-again-")),
        model_cache=ROOT / ".medtune" / "models",
    )
    model_path = resolve(spec.model.base_model, models_dir=settings.models_dir)
    started = time.time()
    loaded = engines.load(spec, model_path, init_adapter=str(adapter))
    prepared = prepare(
        spec.dataset,
        loaded.tokenizer,
        max_seq_length=spec.model.max_seq_length,
        validation=spec.validation_dataset,
    )
    out_dir = Path(tempfile.mkdtemp(prefix="medtune-again-eval-"))
    note = evaluate_job(spec, loaded, prepared, out_dir, settings)
    result = json.loads((out_dir / EVALUATION_FILE).read_text())
    return {
        "job": folder.name,
        "wall_s": round(time.time() - started, 1),
        "adapter_scale": args.adapter_scale,
        "evaluation_config": spec.evaluation.model_dump(),
        "note": note,
        **{k: v for k, v in result.items() if k != "answers"},
        "answers": result["answers"][:4],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("home", type=Path, help="the MEDTUNE_HOME bench/eval_medquad.py used")
    parser.add_argument("--repetition-penalty", type=float, default=DEFAULT_REPETITION_PENALTY)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--max-examples", type=int, help="more held-out questions than the job's")
    parser.add_argument(
        "--batch-size", type=int, help="questions answered in one generate call (default 16)"
    )
    parser.add_argument(
        "--adapter-scale", type=float, default=1.0, help="weight of the adapter's update"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    summary = run(args)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("note", "difference", "generation")}))


if __name__ == "__main__":
    main()
