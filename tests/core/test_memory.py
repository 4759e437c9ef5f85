"""The GPU memory estimate against the peaks measured on the H200 (BENCHMARKS.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.memory import KNOWN_SHAPES, estimate, find_shape
from core.spec import JobSpec

RECIPE_2x2048 = JobSpec.model_validate(
    {
        "model_config": {"max_seq_length": 2048},
        "lora_config": {"use_gradient_checkpointing": "unsloth"},
    }
)

# (shape, engine, measured peak GiB) from bench/results/h200-2026-11-28.jsonl
MEASURED = [
    ("llama-3-8b", "unsloth", 6.79),
    ("mistral-7b", "unsloth", 5.33),
    ("llama-3.2-1b", "unsloth", 1.68),
    ("llama-3-8b", "transformers", 16.49),
    ("llama-3.2-1b", "transformers", 8.47),
]


@pytest.mark.parametrize(("shape", "engine", "peak"), MEASURED)
def test_estimate_is_within_ten_percent_of_the_measured_peak(
    shape: str, engine: str, peak: float
) -> None:
    got = estimate(RECIPE_2x2048, KNOWN_SHAPES[shape], engine=engine).total_gib
    assert got == pytest.approx(peak, rel=0.10)


def test_estimate_grows_with_batch_and_shrinks_with_4bit() -> None:
    shape = KNOWN_SHAPES["llama-3-8b"]
    base = estimate(RECIPE_2x2048, shape).total_gib
    bigger = RECIPE_2x2048.model_copy(
        update={
            "training": RECIPE_2x2048.training.model_copy(update={"per_device_train_batch_size": 8})
        }
    )
    full = RECIPE_2x2048.model_copy(
        update={"model": RECIPE_2x2048.model.model_copy(update={"load_in_4bit": False})}
    )
    assert estimate(bigger, shape).total_gib > base + 3
    assert estimate(full, shape).weights_gib > 2.5 * estimate(RECIPE_2x2048, shape).weights_gib


def test_shape_comes_from_config_json_or_the_family_name(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "vocab_size": 49152,
                "hidden_size": 576,
                "intermediate_size": 1536,
                "num_hidden_layers": 30,
                "num_attention_heads": 9,
                "num_key_value_heads": 3,
                "tie_word_embeddings": True,
            }
        )
    )
    local = find_shape("anything", local_dir=tmp_path)
    assert local is not None and local.kv_size == 192 and local.tie_word_embeddings
    assert find_shape("unsloth/llama-3-8b-Instruct-bnb-4bit") == KNOWN_SHAPES["llama-3-8b"]
    assert find_shape("mistralai/Mistral-7B-Instruct-v0.2") == KNOWN_SHAPES["mistral-7b"]
    assert find_shape("google/gemma-1.1-7b-it") == KNOWN_SHAPES["gemma-1.1-7b"]
    assert find_shape("someone/unknown-model") is None
