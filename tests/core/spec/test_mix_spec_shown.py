"""The stored spec of a mix shows what was trained: its sources, not the recipe's default Hub
dataset in training_dataset.name (#20)."""

from __future__ import annotations

from core.spec import JobSpec


def test_a_mix_is_stored_without_the_unused_single_source_fields() -> None:
    spec = JobSpec.model_validate(
        {"training_dataset": {"sources": [{"name": "sample:medical_qa", "weight": 2}]}}
    )
    stored = spec.to_json()["training_dataset"]
    assert "name" not in stored and "split" not in stored
    assert stored["sources"][0]["name"] == "sample:medical_qa"
    assert JobSpec.model_validate(spec.to_json()) == spec  # a stored spec validates again


def test_a_single_source_keeps_its_name() -> None:
    spec = JobSpec.model_validate({"training_dataset": {"name": "sample:medical_qa"}})
    assert spec.to_json()["training_dataset"]["name"] == "sample:medical_qa"
