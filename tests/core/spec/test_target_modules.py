"""lora_config.target_modules: repeats dropped, at most 64, and names the base model has."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from core.lora_targets import UnknownTargetModule, check_target_modules, valid_modules
from core.routing import config_dir
from core.spec import JobSpec


def lora(targets: list[str]) -> JobSpec:
    return JobSpec.model_validate({"lora_config": {"target_modules": targets}})


def test_repeats_are_dropped_in_order() -> None:
    assert lora(["v_proj", "q_proj", "v_proj", "q_proj"]).lora.target_modules == [
        "v_proj",
        "q_proj",
    ]


def test_a_huge_list_is_refused_not_stored() -> None:
    with pytest.raises(ValidationError) as info:
        lora([f"layer_{i}" for i in range(100_000)])
    error = info.value.errors()[0]
    assert error["loc"] == ("lora_config", "target_modules") and "at most 64" in error["msg"]
    # 100,000 copies of one name are one name.
    assert lora(["q_proj"] * 100_000).lora.target_modules == ["q_proj"]


def test_the_embedded_llama_lists_its_projections(model_cache: Path) -> None:
    local = config_dir("smollm2-135m-instruct", model_cache)
    valid = valid_modules(local)
    assert valid is not None and {"q_proj", "down_proj", "all-linear"} <= set(valid)
    check_target_modules(["q_proj", "v_proj"], local)
    with pytest.raises(UnknownTargetModule) as info:
        check_target_modules(["q_proj", "query_key_value"], local)
    assert info.value.code == "unknown_target_module"
    assert info.value.field == "lora_config.target_modules"
    assert "'query_key_value'" in info.value.detail and "gate_proj" in info.value.detail


def test_an_unreadable_or_unknown_config_checks_nothing(tmp_path: Path) -> None:
    assert valid_modules(None) is None and valid_modules(tmp_path) is None
    (tmp_path / "config.json").write_text('{"model_type": "mamba"}', encoding="utf-8")
    check_target_modules(["in_proj"], tmp_path)
