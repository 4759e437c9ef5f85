"""A job's LoRA adapter folder: the errors a client sees for it, and the check that refuses a
deleted or broken one before peft touches the base model."""

from __future__ import annotations

import json
import logging
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

from core.errors import MedtuneError

log = logging.getLogger(__name__)

# Where core/export/gguf.py writes a job's GGUF exports (its ``file_name``), under artifacts_dir.
GGUF_FOLDER = "gguf"
GGUF_FAST_QUANT = "q4_k_m"
MERGED_FOLDER = "merged_16bit"  # core/export/formats.py's merged export, under artifacts_dir


def job_gguf(artifacts_dir: str | None) -> str | None:
    """A job's q4_k_m GGUF export, if it was written."""
    if not artifacts_dir:
        return None
    path = Path(artifacts_dir) / GGUF_FOLDER / f"model-{GGUF_FAST_QUANT}.gguf"
    return str(path) if path.is_file() else None


def job_merged(artifacts_dir: str | None) -> str | None:
    if not artifacts_dir:
        return None
    path = Path(artifacts_dir) / MERGED_FOLDER
    return str(path) if (path / "config.json").is_file() else None


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


def activate(
    base: Any,
    adapter_dir: str,
    name: str,
    *,
    in_use: set[Any],
    cuda: bool,
    max_adapters: int,
    loads: Counter[str],
) -> None:
    """Make ``name`` one of ``base``'s loaded adapters (``base``: the engine's loaded base, with
    ``model`` and ``adapters``, an LRU of name -> folder), evicting the least recently used one
    not ``in_use`` beyond ``max_adapters``."""
    adapters: OrderedDict[str, str] = base.adapters
    if not Path(adapter_dir).is_dir():
        if name in adapters:  # deleted after it was loaded: forget it too
            adapters.pop(name)
            base.model.delete_adapter(name)
        raise AdapterMissing(
            f"the adapter of {name} was deleted from the server; train the job again",
            field="job_id",
        )
    if name in adapters:
        adapters.move_to_end(name)
        return
    check_adapter_folder(adapter_dir, name)
    try:
        if cuda:
            from core.inference.cuda import attach_adapter

            base.model = attach_adapter(base.model, adapter_dir, name)
        else:
            from peft import PeftModel

            if isinstance(base.model, PeftModel):
                base.model.load_adapter(adapter_dir, adapter_name=name)
            else:
                base.model = PeftModel.from_pretrained(base.model, adapter_dir, adapter_name=name)
            base.model.eval()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        if name in getattr(base.model, "peft_config", {}):
            base.model.delete_adapter(name)
        raise AdapterInvalid(
            f"the adapter of {name} does not fit its base model: {str(exc)[:200]}",
            field="job_id",
        ) from exc
    adapters[name] = adapter_dir
    loads["adapter"] += 1
    log.info("loaded adapter %s (%d cached)", name, len(adapters))
    while len(adapters) > max_adapters:
        oldest = next(n for n in adapters if n not in in_use)
        adapters.pop(oldest)
        if base.model.active_adapter == oldest:
            base.model.set_adapter(name)
        base.model.delete_adapter(oldest)
        loads["evicted"] += 1
