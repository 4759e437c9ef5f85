"""LoftQ through the service's transformers + peft loader on CUDA: LoRA starts from what 4-bit
quantisation loses, so base + LoRA is nearer the original weights than the quantised base."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.spec import JobSpec
from core.training import engines

pytestmark = pytest.mark.gpu


def test_loftq_starts_lora_from_the_quantisation_residual(tiny_llama3: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_llama3, dtype=torch.float32)
    weight = original.model.layers[0].self_attn.q_proj.weight.detach().cuda()
    spec = JobSpec.model_validate(
        {
            "model_config": {"base_model": str(tiny_llama3), "load_in_4bit": False},
            "lora_config": {"r": 8, "target_modules": ["q_proj"], "loftq_config": {}},
            "training_config": {"engine": "transformers"},
        }
    )
    loaded = engines.load(spec, str(tiny_llama3))
    module = loaded.model.base_model.model.model.layers[0].self_attn.q_proj
    quantised = module.base_layer.weight.detach().float()
    assert float(module.lora_B["default"].weight.abs().sum()) > 0  # not the zero start
    delta = module.lora_B["default"].weight.float() @ module.lora_A["default"].weight.float()
    rebuilt = quantised + module.scaling["default"] * delta
    assert float((rebuilt - weight).norm()) < float((quantised - weight).norm())
