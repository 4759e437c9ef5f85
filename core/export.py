"""Export a finished job's model, and prove each artifact still answers.

Formats: ``lora`` (the adapter safetensors + config + tokenizer, loaded back with peft) and
``merged_16bit`` (LoRA merged into the base, saved in bfloat16 and loaded back with plain
transformers). Each artifact is smoke-tested after it is written: loaded by the loader its
users use and asked fixed medical questions; the answers and whether each stopped at the
end-of-turn token go into the manifest. A failed format fails alone, with a code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

MANIFEST = "artifacts.json"  # in the job's artifacts folder
SMOKE_QUESTIONS = ["What is high blood pressure?", "How is type 2 diabetes treated?"]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(folder: Path) -> list[dict[str, Any]]:
    return [
        {"file": p.name, "bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file()
    ]


def _ask(model: Any, tokenizer: Any, system: str, *, max_new_tokens: int) -> list[dict[str, Any]]:
    from core.evaluation import generate_with_stop

    return [
        generate_with_stop(
            model,
            tokenizer,
            [{"role": "system", "content": system}, {"role": "user", "content": q}],
            max_new_tokens=max_new_tokens,
        )
        for q in SMOKE_QUESTIONS
    ]


def _load_kwargs() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        return {"dtype": torch.bfloat16, "device_map": {"": 0}}
    return {"dtype": torch.float32}


def _smoke_lora(folder: Path, base_path: str, system: str, max_new_tokens: int) -> list[Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_path, **_load_kwargs())
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    return _ask(model, AutoTokenizer.from_pretrained(folder), system, max_new_tokens=max_new_tokens)


def _smoke_merged(folder: Path, system: str, max_new_tokens: int) -> list[Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, **_load_kwargs()).eval()
    return _ask(model, AutoTokenizer.from_pretrained(folder), system, max_new_tokens=max_new_tokens)


def _write_merged(loaded: Any, target: Path) -> None:
    import torch

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if loaded.engine == "unsloth":  # dequantises the 4-bit base before merging
        loaded.model.save_pretrained_merged(str(tmp), loaded.tokenizer, save_method="merged_16bit")
    elif "bnb4bit" in loaded.engine:
        raise ValueError(
            "merging into a 4-bit bitsandbytes base loses precision; train with "
            "engine 'unsloth' or load_in_4bit false for a merged_16bit export"
        )
    else:
        merged = loaded.model.merge_and_unload()  # folds LoRA into the base weights, in place
        merged.to(torch.bfloat16).save_pretrained(str(tmp))
        loaded.tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def export_all(
    loaded: Any,
    *,
    job_dir: Path,
    adapter_dir: Path,
    base_path: str,
    formats: list[str],
    system_prompt: str,
    max_new_tokens: int = 96,
) -> dict[str, Any]:
    """Write and smoke-test each format; returns (and saves) the manifest. Merging goes last:
    it changes the in-memory model."""
    manifest: dict[str, Any] = {}
    for fmt in sorted(formats, key=lambda f: f == "merged_16bit"):
        folder = adapter_dir if fmt == "lora" else job_dir / "merged_16bit"
        try:
            if fmt == "merged_16bit":
                _write_merged(loaded, folder)
                answers = _smoke_merged(folder, system_prompt, max_new_tokens)
            else:
                answers = _smoke_lora(folder, base_path, system_prompt, max_new_tokens)
            manifest[fmt] = {
                "status": "ok",
                "folder": folder.name,
                "files": describe(folder),
                "smoke_test": answers,
            }
        except Exception as exc:  # one format failing must not take the others down
            manifest[fmt] = {
                "status": "failed",
                "error": {
                    "code": f"export_{fmt}_failed",
                    "message": f"{type(exc).__name__}: {exc}"[:500],
                },
            }
    tmp = job_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, job_dir / MANIFEST)
    return manifest
