"""The LoRA export's smoke answers come from the model in memory (issue 13: the recipe's 8B base
is not read again), after its saved files are checked to hold exactly that adapter: the answers
are those of peft loading the folder onto the base, and a folder that differs fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.export.formats import SMOKE_QUESTIONS, export_all
from core.pipeline import _save_adapter
from tests.core.export.export_helpers import SYSTEM, fresh_lora

pytestmark = pytest.mark.slow


def _moved_lora(model_dir: Path) -> Any:
    import torch

    loaded = fresh_lora(model_dir)
    with torch.no_grad():  # an adapter that changes the answers, unlike a fresh (zero) one
        for name, param in loaded.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    return loaded


def _lora(loaded: Any, tmp_path: Path, model_dir: Path) -> dict[str, Any]:
    manifest = export_all(
        loaded,
        job_dir=tmp_path,
        adapter_dir=tmp_path / "adapter",
        base_path=str(model_dir),
        formats=["lora"],
        system_prompt=SYSTEM,
        max_new_tokens=12,
    )
    return manifest["lora"]


def test_lora_smoke_answers_from_memory_match_peft_on_the_base(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers
    from peft import PeftModel

    from core.evaluation.run import answer_questions
    from core.export.formats import load_kwargs

    loaded = _moved_lora(model_dir)
    _save_adapter(loaded, tmp_path / "adapter")

    def no_load(*_: Any, **__: Any) -> Any:
        raise AssertionError("the LoRA smoke test loaded a model")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
        entry = _lora(loaded, tmp_path, model_dir)
    assert entry["status"] == "ok", entry
    assert [a["question"] for a in entry["smoke_test"]] == SMOKE_QUESTIONS
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **load_kwargs())
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "adapter")
    prompts = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
        for q in SMOKE_QUESTIONS
    ]
    # Batched as the smoke test asks them, so the two compute the same thing.
    reloaded = [
        a["answer"]
        for a in answer_questions(model, tokenizer, prompts, max_new_tokens=12, batch_size=2)
    ]
    assert [a["answer"] for a in entry["smoke_test"]] == reloaded


def test_a_saved_adapter_that_is_not_the_trained_one_fails(tmp_path: Path, model_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    loaded = _moved_lora(model_dir)
    _save_adapter(loaded, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + torch.ones_like(tensors[first])
    save_file(tensors, str(weights))
    entry = _lora(loaded, tmp_path, model_dir)
    assert entry["status"] == "failed"
    assert entry["error"]["code"] == "adapter_invalid"
    assert first.split(".weight")[0] in entry["error"]["message"]
