"""Gradient checkpointing is skipped only where the card holds the job's largest step without it."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.memory import GIB, KNOWN_SHAPES, estimate
from core.spec import JobSpec
from core.training.checkpointing import choose, most_step_tokens, with_checkpointing

LLAMA3 = KNOWN_SHAPES["llama-3-8b"]


def recipe(**lora: object) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model_config": {"max_seq_length": 2048},
            "lora_config": {"use_gradient_checkpointing": "unsloth", **lora},
            "training_config": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4},
        }
    )


def test_an_h200_trains_the_recipe_without_checkpointing_and_says_why() -> None:
    # The recipe's data: 8 examples a step, the fullest step a few thousand tokens.
    ckpt, note = choose(recipe(), LLAMA3, engine="unsloth", free_bytes=139 * GIB, tokens=6000)
    assert ckpt is False
    assert note is not None and "(6000 tokens)" in note and "same" in note
    # Not knowing the data, the spec's most (8 x 2,048 tokens) does not fit 60% of the card.
    assert choose(recipe(), LLAMA3, engine="unsloth", free_bytes=139 * GIB)[0] == "unsloth"


def test_a_t4_keeps_what_the_spec_asks() -> None:
    t4 = choose(recipe(), LLAMA3, engine="unsloth", free_bytes=15 * GIB, tokens=2000)
    assert t4 == ("unsloth", None)


def test_not_on_cuda_nothing_changes() -> None:
    assert choose(recipe(), LLAMA3, engine="unsloth", free_bytes=None) == ("unsloth", None)
    assert choose(recipe(), None, engine="unsloth", free_bytes=139 * GIB) == ("unsloth", None)


def test_a_job_that_asked_for_none_stays_without() -> None:
    assert choose(
        recipe(use_gradient_checkpointing=False), LLAMA3, engine="unsloth", free_bytes=15 * GIB
    ) == (False, None)


def test_the_decision_uses_the_largest_step_and_the_no_checkpointing_estimate() -> None:
    spec = recipe()
    tokens = most_step_tokens(spec)
    assert tokens == 2 * 4 * 2048
    need = estimate(with_checkpointing(spec, False), LLAMA3, engine="unsloth", tokens=tokens)
    with_ckpt = estimate(spec, LLAMA3, engine="unsloth", tokens=tokens)
    assert need.total_gib > 3 * with_ckpt.total_gib  # every layer keeps its activations
    # Just enough free memory (the 0.6 share) flips the decision; a byte less keeps it.
    # What the job adds beside the loaded base, against the free memory left beside it.
    enough = int((need.total_gib - need.weights_gib) * GIB / 0.6) + 1
    assert choose(spec, LLAMA3, engine="unsloth", free_bytes=enough)[0] is False
    assert choose(spec, LLAMA3, engine="unsloth", free_bytes=enough - GIB)[0] == "unsloth"


def test_with_checkpointing_leaves_the_spec_alone() -> None:
    spec = recipe()
    copy = with_checkpointing(spec, False)
    assert copy.lora.use_gradient_checkpointing is False
    assert spec.lora.use_gradient_checkpointing == "unsloth"
    assert with_checkpointing(spec, None) is spec


def test_the_worker_load_asks_the_data_for_its_fullest_step_and_trains_as_it_chose(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """engines.load on a card with room (faked: this machine has no CUDA): the fullest step
    comes from the data, the adapter and the trainer's arguments go without checkpointing, and
    the job's notes say why; the spec itself is untouched."""
    from core.training import checkpointing, engines, trainer

    spec = JobSpec.model_validate(
        {
            "model_config": {
                "base_model": str(model_dir),
                "max_seq_length": 128,
                "load_in_4bit": False,
            },
            "lora_config": {
                "r": 4,
                "target_modules": ["q_proj"],
                "use_gradient_checkpointing": True,
            },
        }
    )
    monkeypatch.setattr(checkpointing, "free_cuda_bytes", lambda: 100 * GIB)
    asked: list[int] = []

    def fullest() -> int:
        asked.append(1)
        return 300

    loaded = engines.load(spec, str(model_dir), skip_checkpointing=True, step_tokens=fullest)
    try:
        assert asked == [1]
        assert loaded.checkpointing is False
        assert any(
            "gradient checkpointing skipped" in n and "(300 tokens)" in n for n in loaded.notes
        )
        assert spec.lora.use_gradient_checkpointing is True
        args = trainer.training_arguments(spec, loaded, output_dir=tmp_path, notes=[])
        assert args.gradient_checkpointing is False
    finally:
        engines.give_back(loaded)
    kept = engines.load(spec, str(model_dir), skip_checkpointing=False, step_tokens=fullest)
    try:
        assert asked == [1] and kept.checkpointing is True  # not asked: nothing to decide
        args = trainer.training_arguments(spec, kept, output_dir=tmp_path, notes=[])
        assert args.gradient_checkpointing is True
    finally:
        engines.give_back(kept)


def test_a_process_capped_at_a_t4s_memory_sees_a_t4s_free_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The T4 run on an H200 (torch.cuda.set_per_process_memory_fraction): free memory is what
    the cap leaves beside what the process holds, so the recipe keeps its checkpointing."""
    import torch

    from core.training import checkpointing

    total = 141 * GIB
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (130 * GIB, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 6 * GIB)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda: 15 * GIB / total)
    free = checkpointing.free_cuda_bytes()
    assert free is not None and abs(free - 9 * GIB) < 2**20
    assert choose(recipe(), LLAMA3, engine="unsloth", free_bytes=free, tokens=4198)[0] == "unsloth"
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)
    free = checkpointing.free_cuda_bytes()
    assert free == 130 * GIB
    assert choose(recipe(), LLAMA3, engine="unsloth", free_bytes=free, tokens=4198)[0] is False
