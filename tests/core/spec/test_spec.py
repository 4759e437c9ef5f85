"""The job spec: the recipe's layout, its defaults, and what it refuses."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from core.spec import (
    ALL_PROJECTIONS,
    RECIPE_SYSTEM_PROMPT,
    DatasetSection,
    JobSpec,
    ModelSection,
    TrainingSection,
    looks_like_path,
)
from tests.helpers import recipe_spec

SECTIONS = ("model_config", "lora_config", "training_dataset", "training_config")


def errors_of(data: dict[str, Any]) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(data)
    return info.value.errors()


def test_defaults_are_the_recipe_values() -> None:
    spec = JobSpec()
    assert spec.lora.r == 16
    assert spec.lora.lora_alpha == 16
    assert spec.lora.lora_dropout == 0
    assert spec.lora.target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert spec.lora.bias == "none"
    assert spec.model.max_seq_length == 2048
    assert spec.model.load_in_4bit is True
    assert spec.model.dtype is None
    assert spec.training.per_device_train_batch_size == 2
    assert spec.training.gradient_accumulation_steps == 4
    assert spec.training.warmup_steps == 5
    assert spec.training.learning_rate == 2e-4
    assert spec.training.optim == "adamw_8bit"
    assert spec.training.weight_decay == 0.01
    assert spec.training.lr_scheduler_type == "linear"
    assert spec.training.seed == 42
    assert spec.training.output_dir == "outputs"
    assert spec.dataset.system_prompt == (
        "Answer the question truthfully, you are a medical professional."
    )
    assert spec.dataset.system_prompt == RECIPE_SYSTEM_PROMPT


def test_default_target_modules_are_not_shared_between_specs() -> None:
    first = JobSpec()
    first.lora.target_modules.append("lm_head")
    assert JobSpec().lora.target_modules == ALL_PROJECTIONS
    assert "lm_head" not in ALL_PROJECTIONS


def test_recipe_layout_round_trips_through_to_json() -> None:
    recipe = recipe_spec("sample:medical_qa")
    spec = JobSpec.model_validate(recipe)
    out = spec.to_json()

    defaults = JobSpec().to_json()
    # The recipe's top-level keys come back; medtune's own sections come with their defaults.
    assert set(recipe) <= set(out)
    for extra in set(out) - set(recipe):
        assert out[extra] == defaults[extra], extra
    # Every key the recipe wrote comes back under the same name with the same value; the spec
    # only adds its own optional keys, with their default values.
    for section in SECTIONS:
        assert set(recipe[section]) <= set(out[section]), section
        assert set(out[section]) == set(defaults[section]), section
        for key, value in recipe[section].items():
            assert out[section][key] == value, f"{section}.{key}"
        for key in set(out[section]) - set(recipe[section]):
            assert out[section][key] == defaults[section][key], f"{section}.{key}"
    assert out["hugging_face_username"] == "medtune-tests"
    assert out["training_dataset"]["max_samples"] is None
    assert out["training_config"]["engine"] == "auto"

    # The output is itself a valid spec and reproduces the same spec.
    again = JobSpec.model_validate(out)
    assert again == spec
    assert again.to_json() == out


def test_python_field_names_are_not_accepted_for_sections() -> None:
    errs = errors_of({"model": {"base_model": "x"}})
    assert [(e["type"], e["loc"]) for e in errs] == [("extra_forbidden", ("model",))]


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        ({"surprise": 1}, ("surprise",)),
        ({"model_config": {"foo": 1}}, ("model_config", "foo")),
        ({"lora_config": {"rank": 8}}, ("lora_config", "rank")),
        ({"training_dataset": {"path": "x.jsonl"}}, ("training_dataset", "path")),
        ({"training_config": {"epochs": 3}}, ("training_config", "epochs")),
    ],
)
def test_unknown_keys_are_rejected_at_every_level(
    data: dict[str, Any], loc: tuple[str, ...]
) -> None:
    errs = errors_of(data)
    assert [(e["type"], e["loc"]) for e in errs] == [("extra_forbidden", loc)]


def test_unknown_key_inside_full_recipe_is_rejected() -> None:
    recipe = copy.deepcopy(recipe_spec("sample:medical_qa"))
    recipe["lora_config"]["lora_rank"] = 8
    errs = errors_of(recipe)
    assert [(e["type"], e["loc"]) for e in errs] == [
        ("extra_forbidden", ("lora_config", "lora_rank"))
    ]


@pytest.mark.parametrize(
    ("section", "key", "value", "kind"),
    [
        ("training_config", "learning_rate", -1e-4, "greater_than"),
        ("training_config", "learning_rate", 0, "greater_than"),
        ("lora_config", "r", 0, "greater_than_equal"),
        ("lora_config", "lora_dropout", 1.0, "less_than"),
        ("lora_config", "lora_dropout", -0.1, "greater_than_equal"),
        ("lora_config", "target_modules", [], "too_short"),
        ("model_config", "max_seq_length", 8, "greater_than_equal"),
        ("training_config", "per_device_train_batch_size", 0, "greater_than_equal"),
        ("training_config", "optim", "adam_9bit", "literal_error"),
        ("training_config", "seed", -1, "greater_than_equal"),
    ],
)
def test_out_of_range_values_are_rejected(section: str, key: str, value: Any, kind: str) -> None:
    errs = errors_of({section: {key: value}})
    assert [(e["type"], e["loc"]) for e in errs] == [(kind, (section, key))]


def test_boundary_values_inside_the_range_are_accepted() -> None:
    spec = JobSpec.model_validate(
        {
            "lora_config": {"r": 1, "lora_dropout": 0.99},
            "training_config": {"learning_rate": 1.0, "warmup_steps": 0},
        }
    )
    assert (spec.lora.r, spec.lora.lora_dropout) == (1, 0.99)
    assert (spec.training.learning_rate, spec.training.warmup_steps) == (1.0, 0)


def test_fp16_and_bf16_both_true_is_rejected() -> None:
    errs = errors_of({"training_config": {"fp16": True, "bf16": True}})
    assert len(errs) == 1
    assert errs[0]["loc"] == ("training_config",)
    assert "fp16 and bf16" in errs[0]["msg"]


@pytest.mark.parametrize(("fp16", "bf16"), [(True, False), (False, True), (None, None)])
def test_one_half_precision_flag_is_accepted(fp16: bool | None, bf16: bool | None) -> None:
    spec = JobSpec.model_validate({"training_config": {"fp16": fp16, "bf16": bf16}})
    assert (spec.training.fp16, spec.training.bf16) == (fp16, bf16)


@pytest.mark.parametrize(
    "name", ["../outputs", "../../etc", "a/../../b", "..", "/tmp/out", "out/sub", "", "-x"]
)
def test_output_dir_must_be_a_plain_folder_name(name: str) -> None:
    errs = errors_of({"training_config": {"output_dir": name}})
    assert [e["loc"] for e in errs] == [("training_config", "output_dir")]


@pytest.mark.parametrize("name", ["../evil", "../../root/.ssh", "a/../b", "/abs/name", ".hidden"])
def test_finetuned_model_must_be_a_plain_name(name: str) -> None:
    errs = errors_of({"model_config": {"finetuned_model": name}})
    assert [e["loc"] for e in errs] == [("model_config", "finetuned_model")]


@pytest.mark.parametrize("name", ["outputs", "run-1.final", "A_b"])
def test_plain_names_are_accepted(name: str) -> None:
    assert TrainingSection(output_dir=name).output_dir == name
    assert ModelSection(finetuned_model=name).finetuned_model == name


@pytest.mark.parametrize(
    ("model_config", "name"),
    [
        ({"base_model": "smollm2-135m-instruct"}, "smollm2-135m-instruct-medical"),
        ({"base_model": "smollm2-135m-instruct", "finetuned_model": None},
         "smollm2-135m-instruct-medical"),
        ({"base_model": "HuggingFaceTB/SmolLM2-360M-Instruct"}, "SmolLM2-360M-Instruct-medical"),
        ({"base_model": "/srv/models/my model/"}, "my-model-medical"),
        ({"base_model": "./.hidden"}, "hidden-medical"),
        ({}, "llama-3-8b-Instruct-bnb-4bit-medical"),  # the recipe's own name for its base
        ({"base_model": "smollm2-135m-instruct", "finetuned_model": "mine"}, "mine"),
    ],
)  # fmt: skip
def test_finetuned_model_defaults_to_the_base_models_name(
    model_config: dict[str, Any], name: str
) -> None:
    spec = JobSpec.model_validate({"model_config": model_config})
    assert spec.model.finetuned_model == name
    # A stored spec carries the name and validates to the same one.
    assert JobSpec.model_validate(spec.to_json()).model.finetuned_model == name


def test_a_derived_name_is_always_a_valid_one() -> None:
    spec = JobSpec.model_validate({"model_config": {"base_model": "/m/" + "x" * 200}})
    assert len(spec.model.finetuned_model) <= 96
    assert ModelSection(finetuned_model=spec.model.finetuned_model).finetuned_model


@pytest.mark.parametrize("section", ["output_dir", "finetuned_model"])
def test_names_with_a_trailing_newline_are_rejected(section: str) -> None:
    data = (
        {"training_config": {"output_dir": "outputs\n"}}
        if section == "output_dir"
        else {"model_config": {"finetuned_model": "medical\n"}}
    )
    errors_of(data)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("sample:medical_qa", "sample"),
        ("sample:anything", "sample"),  # existence is checked later, by core.data.sources
        ("/data/train.jsonl", "path"),
        ("./train.csv", "path"),
        ("../shared/data", "path"),
        ("~/data/set.parquet", "path"),
        ("train.json", "path"),
        ("TRAIN.JSONL", "path"),
        ("data/qa.csv", "path"),
        ("Shekswess/medical_llama3_instruct_dataset_short", "hub"),
        ("owner/name-1.v2", "hub"),
    ],
)
def test_dataset_kind_detection(name: str, kind: str) -> None:
    assert DatasetSection(name=name).kind == kind


@pytest.mark.parametrize(
    "name", ["not a dataset", "justaname", "owner/", "a/b/c", "owner/na me", "http://x/y", "x.txt"]
)
def test_garbage_dataset_names_are_rejected(name: str) -> None:
    errs = errors_of({"training_dataset": {"name": name}})
    assert [e["loc"] for e in errs] == [("training_dataset",)]
    assert "neither a file path" in errs[0]["msg"]


def test_looks_like_path_needs_a_path_prefix_or_a_data_suffix() -> None:
    assert looks_like_path("./x")
    assert looks_like_path("x.parquet")
    assert not looks_like_path("x.txt")
    assert not looks_like_path("owner/name")
