"""Export a fresh (zero) LoRA of the embedded model: it answers exactly as the base does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.export.formats import export_all
from core.pipeline import _save_adapter
from core.spec import JobSpec
from core.training import engines

SYSTEM = "Answer the question truthfully, you are a medical professional."


def fresh_lora(model_dir: Path) -> engines.Loaded:
    spec = JobSpec.model_validate(
        {
            "model_config": {"base_model": str(model_dir), "load_in_4bit": False},
            "lora_config": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        }
    )
    return engines.load(spec, str(model_dir))


def export(
    job_dir: Path, model_dir: Path, formats: list[str], quants: list[str], *, gguf_tokens: int = 8
) -> Any:
    """Save a fresh adapter under ``job_dir/adapter``, then export and smoke-test ``formats``."""
    loaded = fresh_lora(model_dir)
    _save_adapter(loaded, job_dir / "adapter")
    return export_all(
        loaded,
        job_dir=job_dir,
        adapter_dir=job_dir / "adapter",
        base_path=str(model_dir),
        formats=formats,
        gguf_quantizations=quants,
        name="smollm2-medical-test",
        system_prompt=SYSTEM,
        max_new_tokens=8,
        gguf_max_new_tokens=gguf_tokens,
    )
