"""Spec numbers are JSON numbers, and the recipe's own alternative values are accepted."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from core.spec import JobSpec
from tests.helpers import recipe_spec


def spec_with(section: str, **values: Any) -> dict[str, Any]:
    data = recipe_spec("sample:medical_qa")
    data[section] = {**data[section], **values}
    return data


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("training_config", "max_steps", True),
        ("training_config", "max_steps", "5"),
        ("training_config", "max_steps", 5.0),
        ("training_config", "learning_rate", "2e-4"),
        ("training_config", "learning_rate", True),
        ("training_config", "num_train_epochs", "1"),
        ("lora_config", "r", "16"),
        ("lora_config", "lora_alpha", False),
        ("model_config", "max_seq_length", "256"),
        ("training_dataset", "max_samples", True),
        ("training_dataset", "validation_share", "0.1"),
    ],
)
def test_bools_and_strings_are_not_numbers(section: str, key: str, value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(spec_with(section, **{key: value}))
    error = info.value.errors()[0]
    assert error["loc"] == (section, key)
    assert error["type"] in ("int_type", "float_type")


def test_an_int_is_still_a_float() -> None:
    spec = JobSpec.model_validate(spec_with("lora_config", lora_alpha=32, lora_dropout=0))
    assert spec.lora.lora_alpha == 32.0 and isinstance(spec.lora.lora_alpha, float)
    # A stored spec (model_dump in JSON mode) validates again unchanged.
    assert JobSpec.model_validate(spec.to_json()) == spec


def test_zero_epochs_with_max_steps_is_accepted() -> None:
    spec = JobSpec.model_validate(spec_with("training_config", num_train_epochs=0, max_steps=5))
    assert spec.training.num_train_epochs == 0 and spec.training.max_steps == 5


@pytest.mark.parametrize("max_steps", [0, -1])
def test_zero_epochs_without_max_steps_trains_nothing_and_is_refused(max_steps: int) -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(
            spec_with("training_config", num_train_epochs=0, max_steps=max_steps)
        )
    assert info.value.errors()[0]["loc"] == ("training_config", "num_train_epochs")
    assert "max_steps > 0" in info.value.errors()[0]["msg"]


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        ("torch.float16", "float16"),
        ("torch.bfloat16", "bfloat16"),
        ("float16", "float16"),
        ("bfloat16", "bfloat16"),
        (None, None),
    ],
)
def test_dtype_takes_the_recipes_torch_names(value: str | None, dtype: str | None) -> None:
    spec = JobSpec.model_validate(spec_with("model_config", dtype=value))
    assert spec.model.dtype == dtype
    assert spec.to_json()["model_config"]["dtype"] == dtype


@pytest.mark.parametrize("value", ["torch.float32", "torch.", "fp16", 16])
def test_other_dtypes_are_refused(value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(spec_with("model_config", dtype=value))
    assert info.value.errors()[0]["loc"][:2] == ("model_config", "dtype")
