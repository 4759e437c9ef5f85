"""Exports: each format written, described (size, sha256) and smoke-tested; one failing alone."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from core.export.formats import MANIFEST, SMOKE_QUESTIONS, export_all
from core.pipeline import _save_adapter
from core.spec import JobSpec
from core.training import engines

pytestmark = pytest.mark.slow


def _export(tmp_path: Path, model_dir: Path, formats: list[str], tokens: int) -> dict[str, Any]:
    """Save a fresh adapter of the embedded model, then export and smoke-test ``formats``."""
    loaded = _loaded(model_dir)
    _save_adapter(loaded, tmp_path / "adapter")
    return export_all(
        loaded,
        job_dir=tmp_path,
        adapter_dir=tmp_path / "adapter",
        base_path=str(model_dir),
        formats=formats,
        system_prompt="Be brief.",
        max_new_tokens=tokens,
    )


def _loaded(model_dir: Path) -> engines.Loaded:
    spec = JobSpec.model_validate(
        {
            "model_config": {"base_model": str(model_dir), "load_in_4bit": False},
            "lora_config": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        }
    )
    return engines.load(spec, str(model_dir))


def test_lora_and_merged_round_trip(tmp_path: Path, model_dir: Path) -> None:
    manifest = _export(tmp_path, model_dir, ["merged_16bit", "lora"], tokens=8)
    adapter = tmp_path / "adapter"
    assert json.loads((tmp_path / MANIFEST).read_text()) == manifest
    for fmt, folder in (("lora", adapter), ("merged_16bit", tmp_path / "merged_16bit")):
        entry = manifest[fmt]
        assert entry["status"] == "ok", entry
        assert [a["question"] for a in entry["smoke_test"]] == SMOKE_QUESTIONS
        assert all(a["answer"] and 0 < a["tokens"] <= 8 for a in entry["smoke_test"])
        for f in entry["files"]:
            data = (folder / f["file"]).read_bytes()
            assert f["bytes"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    files = {f["file"] for f in manifest["merged_16bit"]["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert "adapter_model.safetensors" in {f["file"] for f in manifest["lora"]["files"]}
    # A fresh LoRA is zero, so the merged weights answer exactly like the adapter did.
    answers = {fmt: [a["answer"] for a in manifest[fmt]["smoke_test"]] for fmt in manifest}
    assert answers["lora"] == answers["merged_16bit"]


def test_a_failing_format_fails_alone(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.export.formats

    def broken(*_: object, **__: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(core.export.formats, "_write_merged", broken)
    manifest = _export(tmp_path, model_dir, ["lora", "merged_16bit"], tokens=4)
    assert manifest["lora"]["status"] == "ok"
    assert manifest["merged_16bit"]["status"] == "failed"
    assert manifest["merged_16bit"]["error"]["code"] == "export_merged_16bit_failed"
    assert "disk full" in manifest["merged_16bit"]["error"]["message"]
