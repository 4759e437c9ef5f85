"""Time the data stage on all answered MedQuAD pairs: medtune's path against the recipe's.

Both paths parse the XML, clean, render through the Llama 3 Instruct template and tokenize with
answer-only labels, with the real Llama 3 tokenizer (bench/real_tokenizers.py):
- medtune: ``core.data.prepare.prepare`` (batched tokenization, the gate, stats);
- recipe: a pandas DataFrame walked with ``iterrows``, one ``apply_chat_template`` and one
  tokenizer call per row (prompt and full text, for the mask), as in the notebook it came from.

    python bench/medquad_prep.py [MEDQUAD_DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import html
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from core.data.prepare import prepare  # noqa: E402
from core.spec import RECIPE_SYSTEM_PROMPT, DatasetSection  # noqa: E402


def recipe(folder: Path, tokenizer: Any, max_len: int) -> dict[str, Any]:
    import pandas as pd

    records = []
    for path in sorted(folder.rglob("*.xml")):
        root = ET.parse(path).getroot()
        for pair in root.iter("QAPair"):
            records.append(
                {"question": pair.findtext("Question"), "answer": pair.findtext("Answer")}
            )
        for pair in root.iter("pair"):
            records.append(
                {"question": pair.findtext("question"), "answer": pair.findtext("answer")}
            )
    df = pd.DataFrame(records)
    df = df[df["answer"].fillna("").str.strip() != ""].drop_duplicates()
    items = []
    for _, row in df.iterrows():
        question = " ".join(html.unescape(str(row["question"])).split())
        answer = " ".join(html.unescape(str(row["answer"])).split())
        messages = [
            {"role": "system", "content": RECIPE_SYSTEM_PROMPT},
            {"role": "user", "content": question},
        ]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": answer}], tokenize=False
        )
        prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_len]
        labels = [-100] * min(prompt_len, len(ids)) + ids[prompt_len:]
        items.append((ids, labels))
    return {"examples": len(items), "tokens": sum(len(i) for i, _ in items)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("medquad", nargs="?", default=str(ROOT.parent / "shared/data/medquad"))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--max-seq-length", type=int, default=2048)
    args = parser.parse_args()
    from real_tokenizers import build_llama3

    with tempfile.TemporaryDirectory() as tmp:
        build_llama3(Path(tmp) / "llama3")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(Path(tmp) / "llama3")
    corpus = Path(args.medquad).resolve()
    # Dataset paths must lie in an allowed folder: allow the corpus named on the command line.
    os.environ["MEDTUNE_DATA_ROOTS"] = json.dumps([str(corpus)])
    section = DatasetSection(name=str(corpus) + "/")
    for run in range(args.repeat):
        started = time.perf_counter()
        prepared = prepare(section, tokenizer, max_seq_length=args.max_seq_length)
        ours = time.perf_counter() - started
        started = time.perf_counter()
        base = recipe(Path(args.medquad), tokenizer, args.max_seq_length)
        theirs = time.perf_counter() - started
        stats = prepared.stats
        print(
            json.dumps(
                {
                    "run": run,
                    "host": platform.node(),
                    "cpus": os.cpu_count(),
                    "medtune_s": round(ours, 2),
                    "recipe_iterrows_s": round(theirs, 2),
                    "speedup": round(theirs / ours, 2),
                    "medtune_examples": stats["examples"],
                    "medtune_tokens": stats["tokens"],
                    "recipe_examples": base["examples"],
                    "recipe_tokens": base["tokens"],
                    "dropped": stats["dropped"],
                    "length": [stats[f"length_{k}"] for k in ("p50", "p90", "p99", "max")],
                    "trained_token_share": stats["trained_token_share"],
                    "truncation_rate": stats["truncation_rate"],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
