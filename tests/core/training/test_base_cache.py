"""A worker keeps its base model between jobs (issue 13): the second job on a kept base starts
exactly as on a freshly loaded one (same LoRA init, same first loss, same LoRA gradients), with
nothing of the first job left (adapter, gradient checkpointing and its hooks, use_cache, training
mode, requires_grad, chat template), and a base the job wrote into is never reused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.data.conversations import to_examples
from core.data.sources import load_rows
from core.data.tokenize import encode_all, ensure_chat_template
from core.spec import DatasetSection, JobSpec
from core.training import base_cache, engines

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _nothing_kept() -> Iterator[None]:
    base_cache.release("test start")
    yield
    base_cache.release("test end")


def _spec(model_dir: Path, **lora: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model_config": {
                "base_model": str(model_dir),
                "max_seq_length": 128,
                "load_in_4bit": False,
            },
            "lora_config": {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], **lora},
            "training_config": {
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 1,
                "max_steps": 2,
                "warmup_steps": 0,
                "optim": "adamw_torch",
                "learning_rate": 1e-2,
                "save_steps": 0,
                "seed": 7,
            },
        }
    )


def _items(tokenizer: Any) -> list[Any]:
    rows = load_rows(DatasetSection(name="sample:medical_qa", max_samples=4))
    examples = to_examples(rows, system_prompt="Be brief.", input_field="prompt").examples
    return encode_all(tokenizer, examples, max_length=128).items


def _state(model: Any) -> dict[str, Any]:
    """What a job may leave on a model: modules, hooks, flags, trainability, config."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        "modules": [(n, type(m).__name__) for n, m in base.named_modules()],
        "hooks": [
            (n, len(m._forward_hooks), len(m._forward_pre_hooks))
            for n, m in base.named_modules()
            if m._forward_hooks or m._forward_pre_hooks
        ],
        "checkpointing": sorted(
            n for n, m in base.named_modules() if getattr(m, "gradient_checkpointing", False)
        ),
        "training": sorted(n for n, m in base.named_modules() if m.training),
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "use_cache": base.config.use_cache,
    }


def _first_step(loaded: engines.Loaded, items: list[Any]) -> tuple[float, dict[str, Any]]:
    """The loss of a padded batch of the items and the LoRA gradients it gives (lora_B set to
    0.01 in both models first)."""
    import torch

    from core.training.trainer import PadCollator

    batch = PadCollator(loaded.tokenizer.eos_token_id)(
        [{"input_ids": i.input_ids, "labels": i.labels} for i in items]
    )
    model = loaded.model
    with torch.no_grad():  # a LoRA away from zero, so every LoRA weight gets a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)
    model.train()
    out = model(**{k: batch[k] for k in ("input_ids", "labels", "attention_mask")})
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    assert grads and all(torch.count_nonzero(g) for g in grads.values())
    return out.loss.item(), grads


def test_the_second_job_on_a_kept_base_starts_as_on_a_fresh_one(
    model_dir: Path, tmp_path: Path
) -> None:
    import torch

    from core.training import trainer
    from core.training.sink import ListSink

    # Job 1 trains with gradient checkpointing (hooks on the embeddings, use_cache off) and its
    # own chat template, and its LoRA moves away from zero.
    first = _spec(model_dir, use_gradient_checkpointing=True)
    job1 = engines.load(first, str(model_dir), keep=True)
    assert job1.kept is not None and not any("reused" in n for n in job1.notes)
    base = job1.kept.model
    ensure_chat_template(job1.tokenizer, "chatml")
    items = _items(job1.tokenizer)
    outcome = trainer.train(first, job1, items, output_dir=tmp_path / "one", sink=ListSink())
    assert outcome.steps == 2
    lora_b = [p for n, p in job1.model.named_parameters() if "lora_B" in n]
    assert any(torch.count_nonzero(p) for p in lora_b)  # trained: job 1's adapter is not zero
    engines.give_back(job1)
    assert base_cache.kept_key() is not None
    assert not any("lora" in type(m).__name__.lower() for m in base.modules())
    assert not hasattr(base, "peft_config")
    assert not any(p.requires_grad for p in base.parameters()) or all(
        p.requires_grad for p in base.parameters()
    )  # as loaded: transformers hands every weight back trainable

    # Job 2, other LoRA settings, no checkpointing: on the kept base and on a fresh load.
    second = _spec(model_dir, use_gradient_checkpointing=False, r=8)
    kept = engines.load(second, str(model_dir), keep=True)
    assert kept.kept is not None and kept.kept.model is base
    assert any("reused" in n for n in kept.notes)
    fresh = engines.load(second, str(model_dir))
    assert _state(kept.model) == _state(fresh.model)
    assert _state(kept.model)["checkpointing"] == []
    assert kept.tokenizer.chat_template == fresh.tokenizer.chat_template  # not job 1's chatml
    kept_weights = dict(kept.model.named_parameters())
    for name, param in fresh.model.named_parameters():  # the base and the seeded LoRA init
        assert torch.equal(param, kept_weights[name]), name
        assert param.dtype == kept_weights[name].dtype
    loss_kept, grads_kept = _first_step(kept, items)
    loss_fresh, grads_fresh = _first_step(fresh, items)
    assert loss_kept == loss_fresh
    assert grads_kept.keys() == grads_fresh.keys()
    for name, grad in grads_fresh.items():
        assert torch.equal(grad, grads_kept[name]), name
    engines.give_back(kept)
    assert base_cache.kept_key() is not None


def test_a_base_the_job_wrote_into_is_dropped(model_dir: Path) -> None:
    import torch

    spec = _spec(model_dir)
    loaded = engines.load(spec, str(model_dir), keep=True)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)
    loaded.model.merge_and_unload()  # folds the LoRA into the base weights, in place
    engines.give_back(loaded)
    assert base_cache.kept_key() is None
    again = engines.load(spec, str(model_dir), keep=True)
    assert not any("reused" in n for n in again.notes)
    engines.give_back(again)


def test_a_job_on_another_base_frees_the_kept_one(model_dir: Path) -> None:
    spec = _spec(model_dir)
    loaded = engines.load(spec, str(model_dir), keep=True)
    engines.give_back(loaded)
    key = base_cache.kept_key()
    assert key is not None
    other = engines.base_key(_spec(model_dir), str(model_dir) + "-other", "transformers")
    assert base_cache.take(other) is None
    assert base_cache.kept_key() is None
    # Jobs that write into their base (LoftQ, trained biases, merged exports) never keep it.
    assert not engines.keepable(_spec(model_dir, bias="all"), "transformers")
    merged = spec.model_copy(
        update={"export": spec.export.model_copy(update={"formats": ["lora", "merged_16bit"]})}
    )
    assert not engines.keepable(merged, "transformers")
    assert engines.keepable(spec, "transformers")


def test_each_job_gets_its_own_tokenizer_where_the_model_refers_to_it(model_dir: Path) -> None:
    spec = _spec(model_dir)
    base, tokenizer, notes = engines._base_transformers(spec, str(model_dir))
    base.model._saved_temp_tokenizer = tokenizer  # as Unsloth's from_pretrained leaves it
    key = engines.base_key(spec, str(model_dir), "transformers")
    kept = base_cache.Kept.of(key, base, tokenizer, notes)
    assert kept is not None
    seen = []
    for _ in range(2):  # a job, then the next on the restored base
        assert kept.snapshot.restore() is None
        job = kept.job_tokenizer()
        assert base.model._saved_temp_tokenizer is job and job is not tokenizer
        assert job not in seen and job.chat_template == tokenizer.chat_template
        ensure_chat_template(job, "chatml")  # a job's change stays its own
        seen.append(job)
    assert kept.snapshot.restore() is None
    assert base.model._saved_temp_tokenizer is tokenizer
