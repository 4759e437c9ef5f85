"""The worker's own pipeline on CUDA with the Unsloth engine (run on the GPU machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.pipeline import run_job
from core.settings import Settings
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from core.training.checkpoints import for_job
from tests.helpers import recipe_spec, tiny_dataset

pytestmark = pytest.mark.gpu


def _unsloth_spec(data: Path, model_dir: Path, **training: object) -> JobSpec:
    raw = recipe_spec(data, engine="unsloth", **training)
    raw["model_config"].update(base_model=str(model_dir), max_seq_length=512)
    raw["lora_config"]["use_gradient_checkpointing"] = "unsloth"
    raw["export_config"] = {"formats": ["lora", "merged_16bit"]}
    return JobSpec.model_validate(raw)


def test_unsloth_job_trains_checkpoints_and_merges(
    tmp_path: Path, sqlite_url: str, tiny_llama3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("MEDTUNE_MODEL_ROOTS", json.dumps([str(tiny_llama3.parent)]))
    data = tiny_dataset(tmp_path / "tiny.jsonl", rows=16)
    spec = _unsloth_spec(data, tiny_llama3, max_steps=6, save_steps=3)
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, spec).id
    # The "unsloth" checkpointing the spec asks for is what this test exercises: keep it.
    settings = Settings(home=tmp_path, database_url=sqlite_url, skip_checkpointing_when_room=False)
    status = run_job(job_id, settings, worker="gpu0")
    with session_scope(sqlite_url) as s:
        job = jobs.get_job(s, job_id)
        rows, _ = jobs.metrics_page(s, job_id, after_step=-1, limit=100)

    assert status == JobStatus.succeeded, (job.error_code, job.error_message)
    assert job.engine == "unsloth"
    assert [r.step for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all((r.memory_mb or 0) > 0 and (r.peak_memory_mb or 0) > 0 for r in rows)
    assert rows[-1].loss is not None and rows[0].loss is not None
    assert rows[-1].loss < rows[0].loss  # lr 2e-3 on 16 rows: a random model must move
    assert [c.step for c in for_job(job.artifacts_dir, job.spec)] == [3, 6]

    job_dir = Path(job.artifacts_dir or "")
    adapter = load_file(str(Path(job.adapter_dir or "") / "adapter_model.safetensors"))
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
    # Unsloth dequantises the 4-bit base and merges the adapter into 16-bit weights.
    merged_dir = job_dir / "merged_16bit"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama3, dtype=torch.bfloat16)
    name = "model.layers.0.self_attn.q_proj.weight"
    merged_w, base_w = merged.state_dict()[name].float(), base.state_dict()[name].float()
    assert merged_w.shape == base_w.shape
    # NF4 round-trip plus the LoRA delta: close to the base, but not equal to it.
    assert not torch.equal(merged_w, base_w)
    assert (merged_w - base_w).abs().mean() < 0.5 * base_w.abs().mean()
    manifest = json.loads((job_dir / "artifacts.json").read_text())
    assert {"lora", "merged_16bit"} <= set(manifest)
