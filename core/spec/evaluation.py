"""The job spec's ``evaluation_config``: held-out questions asked of base and tuned after
training, and multiple-choice benchmarks (core/evaluation runs it)."""

from __future__ import annotations

from pydantic import Field

from core.spec.base import Float, Int
from core.spec.base import Section as _Section

# The service's decoding default for held-out evaluation and /infer (1.0: plain greedy).
DEFAULT_REPETITION_PENALTY = 1.1


class BenchmarkFile(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    file: str = Field(
        min_length=1,
        max_length=1024,
        description="'sample:medical_mcq', an uploaded file id (file-...), or a server path.",
    )


class EvaluationSection(_Section):
    enabled: bool = Field(
        default=False,
        description="After training, answer the held-out validation questions with the base "
        "model and the tuned adapter, and score both against the reference answers.",
    )
    # 120: on MedQuAD the per-question ROUGE-L difference of tuned and base has a standard
    # deviation of about 0.05, so 120 questions bound the 95% interval to about +-0.01
    # (BENCHMARKS.md, bench/eval_sample_size.py); 32 left +-0.02 undecided.
    max_examples: Int = Field(
        default=120,
        ge=1,
        le=10_000,
        description="Held-out questions asked of both models, distinct, drawn in a seeded random "
        "order from the whole validation set (120: enough to decide a ROUGE-L difference of "
        "about 0.01 on MedQuAD).",
    )
    max_new_tokens: Int = Field(default=128, ge=1, le=4096)
    # 1.1: on 300 held-out MedQuAD questions greedy answers without a penalty looped (an 8-word
    # phrase 3+ times) in 7.7% (base) and 20% (tuned SmolLM2) of cases; with 1.1 in 0.3% and
    # 0.3%, and the tuned model's ROUGE-L gain stayed above zero (BENCHMARKS.md, issue #20).
    # It falls on the answer's own tokens (generate.answer_penalty): counted over the prompt too,
    # it penalised the end-of-turn token and cost both models their stops (session 11).
    repetition_penalty: Float = Field(
        default=DEFAULT_REPETITION_PENALTY,
        ge=1.0,
        le=2.0,
        description="Greedy decoding of both models with this penalty on tokens the answer "
        "repeats (1.0: off; 1.1, the default, as /infer); the same for base and tuned.",
    )
    # 16: on the shared 2-core CPU SmolLM2 answered 16 questions x 64 tokens in 136 s one at a
    # time, 31 s in batches of 8 and 34 s in one of 16, the same answers (BENCHMARKS.md,
    # issue #20); on a GPU decoding is bound by reading the weights, so 16 rows cost about what
    # 8 do, and a batch's KV cache is small beside the model.
    batch_size: Int = Field(
        default=16,
        ge=1,
        le=256,
        description="Held-out questions answered together in one padded generate call (greedy "
        "answers as one at a time give, token for token on float32); 1: one at a time.",
    )
    seed: Int = Field(default=0, ge=0, description="Seeds the question sample and the bootstrap.")
    benchmarks: list[BenchmarkFile] = Field(
        default_factory=list,
        max_length=8,
        description="Multiple-choice sets (JSONL rows {question, options, answer}) scored for "
        "base and tuned by each option's log-likelihood; 'sample:medical_mcq' ships.",
    )
    max_benchmark_questions: Int = Field(default=200, ge=1, le=10_000)
