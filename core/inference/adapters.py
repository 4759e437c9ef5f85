"""A job's LoRA adapter folder: the errors a client sees for it, and the check that refuses a
deleted or broken one before peft touches the base model."""

from __future__ import annotations

import json
from pathlib import Path

from core.errors import MedtuneError


class AdapterMissing(MedtuneError):
    """The job had an adapter folder and it is gone (deleted from the server)."""

    code = "adapter_missing"
    status = 409


class AdapterInvalid(MedtuneError):
    """The adapter folder is there but is not a loadable peft LoRA adapter."""

    code = "adapter_invalid"
    status = 409


class NoAdapter(MedtuneError):
    """The job finished without an adapter to answer with."""

    code = "no_adapter"
    status = 409


def check_adapter_folder(adapter_dir: str, name: str) -> None:
    """Refuse a deleted or broken adapter before peft touches the base model."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise AdapterMissing(
            f"the adapter of {name} was deleted from the server; train the job again",
            field="job_id",
        )
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise AdapterInvalid(
            f"the adapter folder of {name} has no readable adapter_config.json",
            field="job_id",
        ) from exc
    weights = folder / "adapter_model.safetensors"
    if not isinstance(config, dict) or config.get("peft_type") != "LORA" or not weights.is_file():
        raise AdapterInvalid(
            f"the adapter folder of {name} is not a LoRA adapter (adapter_config.json and "
            "adapter_model.safetensors are needed)",
            field="job_id",
        )
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            if not any("lora_" in key for key in fh.keys()):  # noqa: SIM118 (no __iter__)
                raise AdapterInvalid(f"the adapter of {name} holds no LoRA weights", field="job_id")
    except AdapterInvalid:
        raise
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise AdapterInvalid(
            f"the adapter weights of {name} cannot be read (damaged file)", field="job_id"
        ) from exc
