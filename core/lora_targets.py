"""Which module names LoRA may target, read from the base model's config.json (no torch).

Checked at submit time when the config can be read locally (core.routing.config_dir): a name
the architecture does not have would otherwise fail minutes later on a worker, or match nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.errors import SpecError

_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
_MLP = ["gate_proj", "up_proj", "down_proj"]
# Linear layers by model_type; peft's "all-linear" and the embeddings (continued pretraining,
# as Unsloth allows) are accepted everywhere.
_MODULES = {
    "llama": _ATTENTION + _MLP,
    "mistral": _ATTENTION + _MLP,
    "qwen2": _ATTENTION + _MLP,
    "qwen3": _ATTENTION + _MLP,
    "gemma": _ATTENTION + _MLP,
    "gemma2": _ATTENTION + _MLP,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
_ALWAYS = ["all-linear", "embed_tokens", "lm_head"]


class UnknownTargetModule(SpecError):
    code = "unknown_target_module"


def valid_modules(config_dir: Path | None, *, model_type: str | None = None) -> list[str] | None:
    """The names LoRA may target in this model; None when its config or architecture is unknown.

    ``model_type`` stands in for a config that is not on disk (the embedded model before its
    first conversion is a Llama).
    """
    config: object = {}
    if config_dir is not None:
        try:
            config = json.loads((config_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
    found = config.get("model_type") if isinstance(config, dict) else None
    modules = _MODULES.get(str(found or model_type or ""))
    return None if modules is None else modules + _ALWAYS


def check_target_modules(
    targets: list[str], config_dir: Path | None, *, model_type: str | None = None
) -> None:
    valid = valid_modules(config_dir, model_type=model_type)
    if valid is None:
        return
    unknown = [t for t in targets if t not in valid]
    if unknown:
        raise UnknownTargetModule(
            f"{', '.join(repr(t) for t in unknown[:5])} "
            f"{'is not a module' if len(unknown) == 1 else 'are not modules'} of this base "
            f"model; its LoRA targets are {', '.join(valid)}",
            field="lora_config.target_modules",
        )
