"""The eval loss is measured on a seeded sample of at most training_config.eval_max_examples
held-out examples (issue #20: all 311 took 15-20 minutes on the 2-core CPU, twice a job)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.data.conversations import to_examples
from core.data.sources import load_rows
from core.data.tokenize import encode_all
from core.spec import DatasetSection, JobSpec
from core.training.held_out import eval_sample, sample_held_out
from core.training.sink import ListSink
from tests.core.training.test_metrics_training import _held_out_loss


def test_a_seeded_sample_of_at_most_the_limit_in_the_items_order() -> None:
    items = list(range(311))
    sample = sample_held_out(items, limit=200, seed=42)
    assert len(sample) == len(set(sample)) == 200
    assert sample == sorted(sample) and set(sample) <= set(items)
    assert sample == sample_held_out(items, limit=200, seed=42)  # every evaluation the same
    assert sample != sample_held_out(items, limit=200, seed=43)
    assert sample != items[:200]  # drawn from the whole split, not its first rows
    assert sample_held_out(items, limit=311, seed=42) == items
    assert sample_held_out(items, limit=None, seed=42) == items


def _spec(**training: Any) -> JobSpec:
    return JobSpec.model_validate({"training_config": training})


def test_the_note_says_how_many_held_out_examples_the_loss_is_on() -> None:
    assert JobSpec.model_validate({}).training.eval_max_examples == 200
    items = list(range(311))
    sample, note = eval_sample(_spec(seed=7), items)
    assert sample == sample_held_out(items, limit=200, seed=7)
    assert note == (
        "eval loss on a seeded sample of 200 of the 311 held-out examples "
        "(training_config.eval_max_examples)"
    )
    sample, note = eval_sample(_spec(eval_max_examples=None), items)
    assert sample == items and note == "eval loss on all 311 held-out examples"
    assert eval_sample(_spec(eval_strategy="no"), items)[1] is None
    assert eval_sample(_spec(), []) == ([], None)


def test_the_limit_is_validated() -> None:
    from pydantic import ValidationError

    for bad in (0, -1, "5", True):
        with pytest.raises(ValidationError, match="eval_max_examples"):
            _spec(eval_max_examples=bad)


@pytest.mark.slow
def test_step_0_and_the_end_measure_the_loss_on_the_sample(model_dir: Path, tmp_path: Path) -> None:
    from core.training import engines, trainer

    spec = JobSpec.model_validate(
        {
            "model_config": {"base_model": str(model_dir), "max_seq_length": 256},
            "lora_config": {"use_gradient_checkpointing": False},
            "training_config": {
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 1,
                "max_steps": 1,
                "optim": "adamw_torch",
                "save_steps": 0,
                "eval_strategy": "end",
                "eval_max_examples": 2,
            },
        }
    )
    loaded = engines.load(spec, str(model_dir))
    rows = load_rows(DatasetSection(name="sample:medical_qa", max_samples=9))
    examples = to_examples(rows, system_prompt="Be brief.", input_field="prompt").examples
    encoded = encode_all(loaded.tokenizer, examples, max_length=256).items
    train_items, eval_items = encoded[:4], encoded[4:]
    sample = sample_held_out(eval_items, limit=2, seed=spec.training.seed)
    before = _held_out_loss(loaded.model, sample)  # a fresh LoRA: the base's own loss
    assert before != pytest.approx(_held_out_loss(loaded.model, eval_items), rel=1e-3)
    sink = ListSink()
    outcome = trainer.train(
        spec, loaded, train_items, output_dir=tmp_path / "out", sink=sink, eval_items=eval_items
    )
    losses = {r["step"]: r["eval_loss"] for r in sink.rows if r.get("eval_loss") is not None}
    assert losses[0] == pytest.approx(before, rel=1e-4)
    assert losses[1] == pytest.approx(_held_out_loss(loaded.model, sample), rel=1e-3)
    assert "eval loss on a seeded sample of 2 of the 5 held-out examples" in outcome.notes[0]
