"""LoRA options reach peft through the service's own loader: rsLoRA and DoRA change the adapter,
and a LoftQ spec that cannot work is refused (at submit, and on a CPU worker before loading)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from core.errors import MedtuneError
from core.spec import JobSpec
from core.training import engines

R, ALPHA = 4, 8


def _spec(**lora: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model_config": {"base_model": "smollm2-135m-instruct", "load_in_4bit": False},
            "lora_config": {"r": R, "lora_alpha": ALPHA, "target_modules": ["q_proj"], **lora},
            "training_config": {"engine": "transformers"},
        }
    )


def _q_proj(loaded: engines.Loaded) -> Any:
    return loaded.model.base_model.model.model.layers[0].self_attn.q_proj


def test_loftq_needs_a_full_precision_base_and_known_keys() -> None:
    with pytest.raises(ValidationError, match="load_in_4bit"):
        JobSpec.model_validate({"lora_config": {"loftq_config": {"loftq_bits": 4}}})
    with pytest.raises(ValidationError):
        _spec(loftq_config={"bits": 4})
    with pytest.raises(ValidationError):
        _spec(loftq_config={"loftq_bits": 2})
    assert _spec(loftq_config={}).lora.loftq_config.loftq_bits == 4  # type: ignore[union-attr]


def test_loftq_on_a_cpu_worker_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    # peft's LoftQ quantises with bitsandbytes on CUDA only; the GPU test runs it for real.
    with pytest.raises(MedtuneError) as info:
        engines.load(_spec(loftq_config={"loftq_bits": 4}), str(tmp_path / "never-read"))
    assert info.value.code == "loftq_needs_cuda"
    assert info.value.field == "lora_config.loftq_config"


def test_rslora_and_dora_change_the_adapter(model_dir: Path) -> None:
    plain = _q_proj(engines.load(_spec(), str(model_dir)))
    rslora = _q_proj(engines.load(_spec(use_rslora=True), str(model_dir)))
    dora = _q_proj(engines.load(_spec(use_dora=True), str(model_dir)))
    assert plain.scaling["default"] == pytest.approx(ALPHA / R)
    assert rslora.scaling["default"] == pytest.approx(ALPHA / math.sqrt(R))
    assert "default" in dora.lora_magnitude_vector and "default" not in plain.lora_magnitude_vector
    # The same non-zero factors give three different outputs.
    x = torch.randn(2, plain.in_features, generator=torch.Generator().manual_seed(0))
    outputs = []
    for module in (plain, rslora, dora):
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(
                torch.full_like(plain.lora_A["default"].weight, 0.01)
            )
            module.lora_B["default"].weight.copy_(
                torch.full_like(plain.lora_B["default"].weight, 0.02)
            )
            outputs.append(module(x))
    assert not torch.allclose(outputs[0], outputs[1])
    assert not torch.allclose(outputs[0], outputs[2])
