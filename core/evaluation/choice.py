"""Multiple-choice benchmarks (the MedQA / MedMCQA / PubMedQA layout): accuracy of base and
tuned, each option scored by its log-likelihood as the assistant's reply under the chat template.

A row is ``{"question": str, "options": [str, ...], "answer": int | "B" | option text}``. The
question is asked with its options listed by letter; the option with the highest summed
log-probability of its tokens is the model's choice (lm-evaluation-harness' ``acc``).
"""

from __future__ import annotations

import json
import string
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from core.data.tokenize import render
from core.errors import DatasetNotFound, SpecError
from core.paths import is_inside

SAMPLES = {"medical_mcq": "medical_mcq_sample.jsonl"}
FIELD = "evaluation_config.benchmarks"


class BenchmarkPathNotAllowed(SpecError):
    code = "benchmark_path_not_allowed"


@dataclass
class Question:
    question: str
    options: list[str]
    answer: int


@dataclass
class Benchmark:
    name: str
    questions: list[Question]
    dropped: Counter[str] = field(default_factory=Counter)


def resolve_file(name: str, *, roots: Sequence[Path], uploads: Path) -> Path:
    """A benchmark file: a shipped sample, an uploaded file id, or a path inside ``roots``."""
    from core.store import files

    if name.startswith("sample:"):
        key = name.removeprefix("sample:")
        if key not in SAMPLES:
            raise DatasetNotFound(
                f"unknown benchmark sample {name!r}; shipped: "
                + ", ".join(f"sample:{k}" for k in SAMPLES),
                field=FIELD,
            )
        return Path(str(resources.files("core") / "samples" / SAMPLES[key]))
    if name.startswith("file-"):
        return files.resolve(name, uploads)
    path = Path(name)
    if not is_inside(path, roots) or is_inside(path, [uploads]):
        raise BenchmarkPathNotAllowed(
            f"benchmark file {name!r} is outside the folders datasets may come from; upload it "
            "with POST /files and name it by its id",
            field=FIELD,
        )
    if not path.is_file():
        raise DatasetNotFound(f"benchmark file {name!r} does not exist", field=FIELD)
    return path


def _answer_index(answer: Any, options: list[str]) -> int | None:
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer if 0 <= answer < len(options) else None
    if isinstance(answer, str):
        text = answer.strip()
        if len(text) == 1 and text.upper() in string.ascii_uppercase[: len(options)]:
            return string.ascii_uppercase.index(text.upper())
        if text in options:
            return options.index(text)
    return None


def load(name: str, path: Path, *, limit: int) -> Benchmark:
    """Up to ``limit`` questions; rows that cannot be read are dropped and counted by reason."""
    bench = Benchmark(name=name, questions=[])
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bench.dropped["invalid_json"] += 1
                continue
            options = row.get("options") if isinstance(row, dict) else None
            if isinstance(options, dict):  # {"A": "...", "B": "..."}, as MedQA ships
                options = [options[k] for k in sorted(options)]
            question = row.get("question") if isinstance(row, dict) else None
            if not isinstance(question, str) or not question.strip():
                bench.dropped["no_question"] += 1
                continue
            if not isinstance(options, list) or len(options) < 2:
                bench.dropped["fewer_than_two_options"] += 1
                continue
            options = [str(o) for o in options]
            answer = _answer_index(row.get("answer"), options)
            if answer is None:
                bench.dropped["answer_not_an_option"] += 1
                continue
            bench.questions.append(Question(question.strip(), options, answer))
            if len(bench.questions) >= limit:
                break
    return bench


def prompt_messages(question: Question, system_prompt: str | None) -> list[dict[str, str]]:
    listed = "\n".join(
        f"{string.ascii_uppercase[i]}. {option}" for i, option in enumerate(question.options)
    )
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, {"role": "user", "content": f"{question.question}\n{listed}"}]


def option_loglikelihoods(
    model: Any, tokenizer: Any, question: Question, *, system_prompt: str | None
) -> list[float]:
    """Summed log-probability of each option's tokens after the rendered prompt."""
    import torch

    prompt = render(tokenizer, prompt_messages(question, system_prompt), add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    scores = []
    for option in question.options:
        option_ids = tokenizer(option, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + option_ids], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(option_ids, device=device)
        scores.append(float(logprobs.gather(1, target[:, None]).sum()))
    return scores


def correct(
    model: Any, tokenizer: Any, bench: Benchmark, *, adapter: bool, system_prompt: str | None
) -> list[float]:
    """1.0 or 0.0 per question, for the tuned adapter or (``adapter=False``) the base model."""
    from core.inference.generate import is_peft

    off = model.disable_adapter() if not adapter and is_peft(model) else nullcontext()
    out = []
    with off:
        for q in bench.questions:
            scores = option_loglikelihoods(model, tokenizer, q, system_prompt=system_prompt)
            out.append(float(max(range(len(scores)), key=scores.__getitem__) == q.answer))
    return out
