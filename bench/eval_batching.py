"""How much batching speeds up the evaluation stage's answers (issue #20), and that it changes
none of them: SmolLM2-135M (the embedded model, float32) answers the same held-out questions,
greedy, one at a time and ``--batch-sizes`` at a time through core.evaluation.run's own
``answer_questions``.

    OMP_NUM_THREADS=2 python bench/eval_batching.py --out bench/results/eval-batching-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from core.data.conversations import to_examples
from core.data.sources import load_rows
from core.embedded_model import EMBEDDED_MODEL_NAME, prepare_embedded_model
from core.evaluation.run import answer_questions, sample_questions
from core.spec import RECIPE_SYSTEM_PROMPT, DatasetSection

ROOT = Path(__file__).resolve().parents[1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = prepare_embedded_model(ROOT / ".medtune" / "models")
    assert model_dir.name == EMBEDDED_MODEL_NAME
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = load_rows(DatasetSection(name="sample:medical_qa"))
    examples = to_examples(rows, system_prompt=RECIPE_SYSTEM_PROMPT, input_field="prompt").examples
    chosen = sample_questions(examples, args.questions, seed=0)
    prompts = [e.messages[:-1] for e in chosen if e.messages is not None]
    runs = []
    reference: list[dict[str, Any]] | None = None
    for size in args.batch_sizes:
        started = time.perf_counter()
        answers = answer_questions(
            model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=size
        )
        seconds = time.perf_counter() - started
        reference = reference if reference is not None else answers
        runs.append(
            {
                "batch_size": size,
                "seconds": round(seconds, 1),
                "tokens": sum(a["tokens"] for a in answers),
                "stopped": sum(a["stopped"] for a in answers),
                "same_answers_as_first": answers == reference,
            }
        )
        print(json.dumps(runs[-1]), flush=True)
    return {
        "model": EMBEDDED_MODEL_NAME,
        "questions": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average": os.getloadavg(),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    summary = run(args)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
