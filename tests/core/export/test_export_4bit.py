"""merged_4bit on the CPU: bitsandbytes NF4 weights that transformers loads back and that answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.export.formats import bnb_4bit_supported
from tests.core.export.export_helpers import export

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not bnb_4bit_supported(), reason="bitsandbytes >= 0.46 (the export extra)"),
]


def test_merged_4bit_round_trip(tmp_path: Path, model_dir: Path) -> None:
    manifest = export(tmp_path, model_dir, ["merged_4bit"], [])
    entry = manifest["merged_4bit"]
    assert entry["status"] == "ok", entry
    folder = tmp_path / "merged_4bit"
    quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quantization["load_in_4bit"] and quantization["bnb_4bit_quant_type"] == "nf4"
    files = {f["file"] for f in entry["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    # Packed 4-bit weights: well under the 16-bit merge of the same model (about 270 MB).
    weights = next(f for f in entry["files"] if f["file"] == "model.safetensors")
    assert weights["bytes"] < 200_000_000
    assert all(a["answer"] and 0 < a["tokens"] <= 8 for a in entry["smoke_test"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, device_map={"": "cpu"})
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert not (tmp_path / ".merged-staging").exists()
