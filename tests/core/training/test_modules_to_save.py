"""lora_config.modules_to_save: the embeddings and the LM head trained in full beside LoRA (for
continued pretraining); SmolLM2 ties them, and one trained copy serves both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.memory import estimate, shape_from_config
from core.pipeline import run_job
from core.settings import Settings
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from core.training.engines import keepable
from tests.helpers import recipe_spec

WORDS = ["anemia", "iron", "ferritin", "hemoglobin", "fatigue", "pallor", "marrow", "folate"]


def _spec(dataset: Path | str, modules: list[str], **training: object) -> JobSpec:
    raw = recipe_spec(dataset, **training)
    raw["lora_config"]["modules_to_save"] = modules
    return JobSpec.model_validate(raw)


def test_only_the_embeddings_and_the_head_and_each_once() -> None:
    spec = _spec("sample:medical_qa", ["lm_head", "embed_tokens", "lm_head"])
    assert spec.lora.modules_to_save == ["lm_head", "embed_tokens"]
    with pytest.raises(ValidationError) as refused:
        _spec("sample:medical_qa", ["q_proj"])
    assert refused.value.errors()[0]["loc"] == ("lora_config", "modules_to_save", 0)
    assert _spec("sample:medical_qa", []).lora.modules_to_save == []


def test_a_worker_does_not_keep_a_base_whose_embeddings_a_job_wrapped() -> None:
    assert keepable(_spec("sample:medical_qa", []), "transformers")
    assert not keepable(_spec("sample:medical_qa", ["embed_tokens"]), "transformers")
    assert not keepable(_spec("sample:medical_qa", ["lm_head"]), "unsloth")


def test_the_memory_estimate_counts_the_trained_copies(model_dir: Path) -> None:
    shape = shape_from_config(model_dir / "config.json")
    assert shape is not None and shape.tie_word_embeddings
    lora_only = estimate(_spec("sample:medical_qa", []), shape).lora_gib
    tied = estimate(_spec("sample:medical_qa", ["embed_tokens", "lm_head"]), shape).lora_gib
    # One fp32 copy with its gradient and two Adam moments: 16 bytes a weight.
    assert tied - lora_only == pytest.approx(shape.vocab_size * shape.hidden_size * 16 / 2**30)
    untied = shape.__class__(**{**shape.__dict__, "tie_word_embeddings": False})
    both = estimate(_spec("sample:medical_qa", ["embed_tokens", "lm_head"]), untied).lora_gib
    assert both - estimate(_spec("sample:medical_qa", []), untied).lora_gib == pytest.approx(
        2 * (tied - lora_only)
    )


@pytest.mark.slow
def test_a_text_job_trains_the_tied_embeddings_once(
    tmp_path: Path, sqlite_url: str, model_cache: Path, model_dir: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    corpus = tmp_path / "corpus.jsonl"
    docs = [" ".join(WORDS[(i + k) % 8] for k in range(20 + 3 * i)) for i in range(12)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    spec = _spec(corpus, ["embed_tokens", "lm_head"], max_steps=2, save_steps=0)
    spec.dataset.format, spec.dataset.min_examples = "text", 8
    spec.model.max_seq_length = 64
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, spec).id
    settings = Settings(home=tmp_path / "home", database_url=sqlite_url, model_cache=model_cache)
    status = run_job(job_id, settings, worker="w")
    with session_scope(sqlite_url) as s:
        job = jobs.get_job(s, job_id)
    assert status == JobStatus.succeeded, (job.error_code, job.error_message)

    adapter = Path(job.adapter_dir or "")
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    # peft keeps the tied pair as one module to save, the head following the embeddings.
    assert "embed_tokens" in config["modules_to_save"] and config["ensure_weight_tying"]
    embed = saved["base_model.model.model.embed_tokens.weight"]
    head = saved["base_model.model.lm_head.weight"]
    assert torch.equal(embed, head)  # still tied: one trained copy
    base = load_file(str(model_dir / "model.safetensors"))["model.embed_tokens.weight"]
    assert not torch.equal(embed, base.to(embed.dtype))  # and trained
    assert any(k.endswith("lora_A.weight") for k in saved)  # beside the LoRA adapter
