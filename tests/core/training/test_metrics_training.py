"""Metrics of real training runs (SmolLM2 on the CPU): full rows, eval loss, flush order, events."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from core.data.conversations import to_examples
from core.data.sources import load_rows
from core.data.tokenize import IGNORE_INDEX, encode_all
from core.pipeline import run_job
from core.settings import Settings
from core.spec import DatasetSection, JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from core.training import checkpoints
from core.training.sink import ListSink, TeeSink
from core.training.tensorboard import TENSORBOARD_DIR, TensorBoardSink, tag_for
from tests.helpers import recipe_spec, tiny_dataset

# Each test trains the real model on the CPU (minutes when the machine is shared).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

TRAINING_FIELDS = (
    "loss",
    "learning_rate",
    "grad_norm",
    "epoch",
    "tokens_per_second",
    "samples_per_second",
    "memory_mb",
    "peak_memory_mb",
    "eta_seconds",
)


class FlushRecorder(ListSink):
    """Notes, at every flush, the last step logged and the checkpoints already on disk."""

    def __init__(self, checkpoint_root: Path) -> None:
        super().__init__()
        self.checkpoint_root = checkpoint_root
        self.seen: list[tuple[int, set[int]]] = []

    def flush(self) -> None:
        super().flush()
        on_disk = {c.step for c in checkpoints.list_checkpoints(self.checkpoint_root)}
        self.seen.append((int(self.rows[-1]["step"]) if self.rows else 0, on_disk))  # type: ignore[arg-type]


def _held_out_loss(model: Any, items: list[Any]) -> float:
    """Token-weighted loss of each example on its own: no batching, no padding."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for item in items:
            labels = torch.tensor([item.labels])
            tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
            loss = model(input_ids=torch.tensor([item.input_ids]), labels=labels).loss
            total, count = total + float(loss) * tokens, count + tokens
    return total / count


def _scalars(log_dir: Path, name: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag_for(name))}


def test_every_row_is_complete_and_eval_loss_is_the_held_out_loss(
    model_dir: Path, tmp_path: Path
) -> None:
    from core.training import engines, trainer

    spec = JobSpec.model_validate(
        {
            "model_config": {"base_model": str(model_dir), "max_seq_length": 256},
            "lora_config": {"use_gradient_checkpointing": False},
            "training_config": {
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 1,
                "max_steps": 4,
                "learning_rate": 2e-3,
                "optim": "adamw_torch",
                "save_steps": 2,
                "eval_steps": 3,
            },
        }
    )
    loaded = engines.load(spec, str(model_dir))
    rows = load_rows(DatasetSection(name="sample:medical_qa", max_samples=11))
    examples = to_examples(rows, system_prompt="Be brief.", input_field="prompt").examples
    encoded = encode_all(loaded.tokenizer, examples, max_length=256).items
    train_items, eval_items = encoded[:8], encoded[8:]
    output_dir = tmp_path / "out"
    before = _held_out_loss(loaded.model, eval_items)  # a fresh LoRA: the base's own loss
    sink = FlushRecorder(checkpoints.checkpoint_dir(output_dir))
    events = TensorBoardSink(tmp_path / TENSORBOARD_DIR, resume_step=0)
    outcome = trainer.train(
        spec,
        loaded,
        train_items,
        output_dir=output_dir,
        sink=TeeSink(sink, events),
        eval_items=eval_items,
    )
    events.close()
    assert outcome.steps == 4
    # Step 0 holds the held-out loss before training, beside the trained model's later ones.
    assert [r["step"] for r in sink.rows] == [0, 1, 2, 3, 4]
    assert sink.rows[0]["eval_loss"] == pytest.approx(before, rel=1e-4)
    assert set(sink.rows[0]) == {"step", "eval_loss"}
    for row in sink.rows[1:]:
        missing = [k for k in TRAINING_FIELDS if row.get(k) is None]
        assert not missing, (row["step"], missing)
        assert row["tokens_per_second"] > 0 and row["samples_per_second"] > 0  # type: ignore[operator]
        assert row["peak_memory_mb"] >= row["memory_mb"] > 0  # type: ignore[operator]
        assert row["reserved_memory_mb"] is None  # no CUDA caching allocator on the CPU
    assert sink.rows[-1]["eta_seconds"] == 0.0 and sink.rows[1]["eta_seconds"] > 0  # type: ignore[operator]
    # Before training, every eval_steps (3) and at the end (4), in the row of that step.
    assert [r["step"] for r in sink.rows if r.get("eval_loss") is not None] == [0, 3, 4]
    assert all(math.isfinite(r["eval_loss"]) for r in sink.rows if r.get("eval_loss"))  # type: ignore[arg-type]
    # The last eval loss is the trained model's loss on the held-out tokens, batched or not.
    assert sink.rows[-1]["eval_loss"] == pytest.approx(
        _held_out_loss(loaded.model, eval_items), rel=1e-3
    )
    # Each checkpoint was written after the rows up to its step were flushed, never before.
    for step in (2, 4):
        assert any(last == step and step not in on_disk for last, on_disk in sink.seen), sink.seen
    assert sink.seen[-1][0] == 4  # and the end flushed everything
    # TensorBoard's reader finds every metric at every step it was logged.
    for name in (*TRAINING_FIELDS, "eval_loss"):
        logged = {r["step"]: r[name] for r in sink.rows if r.get(name) is not None}
        assert _scalars(tmp_path / TENSORBOARD_DIR, name) == pytest.approx(logged), name


def test_a_job_with_a_validation_split_stores_eval_loss_and_tensorboard_events(
    tmp_path: Path, sqlite_url: str, model_cache: Path
) -> None:
    spec = recipe_spec(tiny_dataset(tmp_path / "tiny.jsonl"), max_steps=2, save_steps=0)
    spec["training_dataset"]["validation_share"] = 0.25  # eval_steps null: every step here
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, JobSpec.model_validate(spec)).id
    settings = Settings(home=tmp_path, database_url=sqlite_url, model_cache=model_cache)
    status = run_job(job_id, settings, worker="w")
    with session_scope(sqlite_url) as s:
        job = jobs.get_job(s, job_id)
        rows, _ = jobs.metrics_page(s, job_id, after_step=-1, limit=100)
    assert status == JobStatus.succeeded, (job.error_code, job.error_message)
    assert [r.step for r in rows] == [0, 1, 2]  # step 0: the held-out loss before training
    assert all(r.eval_loss is not None and math.isfinite(r.eval_loss) for r in rows)
    assert all(getattr(r, k) is not None for r in rows[1:] for k in TRAINING_FIELDS)
    # The job's own event files, where `tensorboard --logdir <home>/jobs` finds them.
    for name in (*TRAINING_FIELDS, "eval_loss"):
        points = _scalars(tmp_path / "jobs" / job_id / TENSORBOARD_DIR, name)
        logged = {r.step: getattr(r, name) for r in rows if getattr(r, name) is not None}
        assert points == pytest.approx(logged), name
