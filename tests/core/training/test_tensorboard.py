"""TensorBoard event files: TensorBoard's own reader finds every metric at every step."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from core.store.jobs import METRIC_FIELDS
from core.training.tensorboard import TensorBoardSink, tag_for


def _read(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return events


def _row(step: int) -> dict[str, float | None]:
    # A distinct value per metric and step, so a value read back names where it came from.
    return {name: step * 100.0 + i for i, name in enumerate(METRIC_FIELDS)}


def test_every_metric_is_a_scalar_at_every_step(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path / "tb", resume_step=0)
    for step in (1, 2, 3):
        sink.log(step, _row(step))
    sink.log(4, {"loss": 9.0, "eval_loss": None})  # None: nothing written
    sink.close()
    events = _read(tmp_path / "tb")
    assert set(events.Tags()["scalars"]) == {tag_for(name) for name in METRIC_FIELDS}
    for i, name in enumerate(METRIC_FIELDS):
        points = [(e.step, e.value) for e in events.Scalars(tag_for(name))]
        expected = [(step, step * 100.0 + i) for step in (1, 2, 3)]
        if name == "loss":
            expected.append((4, 9.0))
        assert points == expected, name


def test_a_resumed_run_replaces_the_steps_logged_after_its_checkpoint(tmp_path: Path) -> None:
    lost = TensorBoardSink(tmp_path / "tb", resume_step=0)
    for step in range(1, 6):  # the worker dies after step 5; the checkpoint was at step 3
        lost.log(step, {"loss": 10.0 + step})
    lost.close()
    resumed = TensorBoardSink(tmp_path / "tb", resume_step=3)
    for step in range(4, 7):
        resumed.log(step, {"loss": 20.0 + step})
    resumed.close()
    points = [(e.step, e.value) for e in _read(tmp_path / "tb").Scalars("train/loss")]
    assert points == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0), (6, 26.0)]
