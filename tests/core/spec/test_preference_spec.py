"""training_config.method and training_config.preference in the job spec."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from core.spec import JobSpec
from core.spec.preference import lengths
from tests.helpers import recipe_spec


def spec_of(**training: Any) -> dict[str, Any]:
    return recipe_spec("sample:medical_preference", **training)


def error_of(data: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(data)
    errors = info.value.errors()
    assert len(errors) == 1, errors
    return dict(errors[0])


def test_sft_is_the_default_and_a_dpo_spec_round_trips() -> None:
    assert JobSpec.model_validate(spec_of()).training.method == "sft"
    spec = JobSpec.model_validate(
        spec_of(method="dpo", preference={"beta": 0.2, "loss_type": "ipo"})
    )
    again = JobSpec.model_validate(spec.to_json())
    assert again.training.method == "dpo"
    assert again.training.preference is not None
    assert (again.training.preference.beta, again.training.preference.loss_type) == (0.2, "ipo")


@pytest.mark.parametrize("beta", [0, -0.5])
def test_beta_must_be_above_zero(beta: float) -> None:
    error = error_of(spec_of(method="dpo", preference={"beta": beta}))
    assert error["type"] == "greater_than"
    assert error["loc"] == ("training_config", "preference", "beta")


@pytest.mark.parametrize(
    ("training", "names"),
    [
        ({"preference": {"beta": 0.1}}, "training_config.preference applies"),
        ({"method": "orpo", "preference": {"loss_type": "sigmoid"}}, "loss_type chooses"),
        ({"method": "dpo", "packing": True}, "training_config.packing is for sft"),
    ],
)
def test_a_setting_the_method_cannot_use_is_a_method_conflict(
    training: dict[str, Any], names: str
) -> None:
    error = error_of(spec_of(**training))
    assert error["type"] == "method_conflict"
    assert names in error["msg"]


def test_a_mix_and_a_column_map_are_refused_for_preference_jobs() -> None:
    mixed = spec_of(method="dpo")
    mixed["training_dataset"] = {"sources": [{"name": "sample:medical_preference"}]}
    assert "training_dataset.sources" in error_of(mixed)["msg"]
    mapped = spec_of(method="orpo")
    mapped["training_dataset"]["columns"] = {"question": "q", "answer": "a"}
    error = error_of(mapped)
    assert error["type"] == "method_conflict" and "rename_columns" in error["msg"]


@pytest.mark.parametrize("method", ["dpo", "orpo"])
@pytest.mark.parametrize("section", ["training_dataset", "validation_dataset"])
def test_raw_text_is_refused_for_preference_jobs(method: str, section: str) -> None:
    data = spec_of(method=method)
    if section == "validation_dataset":
        data[section] = {"name": "sample:medical_preference"}
    data[section]["format"] = "text"
    error = error_of(data)
    assert error["type"] == "method_conflict"
    assert f'{section}.format "text"' in error["msg"], error["msg"]
    data[section]["format"] = "records"
    assert JobSpec.model_validate(data).training.method == method


def test_prompt_and_answer_budgets_fit_max_seq_length() -> None:
    too_long = spec_of(
        method="dpo", preference={"max_prompt_length": 200, "max_completion_length": 100}
    )
    error = error_of(too_long)  # recipe_spec's max_seq_length is 256
    assert error["type"] == "method_conflict" and "max_completion_length" in error["msg"]
    spec = JobSpec.model_validate(spec_of(method="dpo", preference={"max_prompt_length": 100}))
    assert lengths(spec.training.preference, spec.model.max_seq_length) == (100, 156)
    assert lengths(None, 256) == (128, 128)


def test_a_preference_job_is_routed_for_two_sequences_a_pair() -> None:
    from core.memory import KNOWN_SHAPES, estimate

    shape = next(iter(KNOWN_SHAPES.values()))
    sft = estimate(JobSpec.model_validate(spec_of()), shape)
    dpo = estimate(JobSpec.model_validate(spec_of(method="dpo")), shape)
    assert dpo.activations_gib == pytest.approx(2 * sft.activations_gib)
    assert dpo.weights_gib == sft.weights_gib
