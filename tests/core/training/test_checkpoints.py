"""Checkpoint folders: only complete ones count, newest found for resume, old ones pruned."""

from __future__ import annotations

import json
from pathlib import Path

from core.training import checkpoints


def _stage(root: Path, step: int, loss: float) -> Path:
    staged = root / checkpoints.STAGING / f"checkpoint-{step}"
    staged.mkdir(parents=True)
    (staged / "trainer_state.json").write_text(
        json.dumps({"log_history": [{"loss": loss + 1}, {"loss": loss}, {"train_loss": 9}]})
    )
    return staged


def test_publish_list_latest_and_prune(tmp_path: Path) -> None:
    for step, loss in ((3, 2.5), (6, 2.0), (9, 1.5)):
        checkpoints.publish(_stage(tmp_path, step, loss), tmp_path)
    # A save interrupted mid-write stays in staging and is never listed.
    (tmp_path / checkpoints.STAGING / "checkpoint-12").mkdir(parents=True)
    (tmp_path / "checkpoint-x").mkdir()
    found = checkpoints.list_checkpoints(tmp_path)
    assert [c.step for c in found] == [3, 6, 9]
    assert [c.loss for c in found] == [2.5, 2.0, 1.5]
    assert checkpoints.latest(tmp_path).step == 9  # type: ignore[union-attr]
    checkpoints.prune(tmp_path, keep=2)
    assert [c.step for c in checkpoints.list_checkpoints(tmp_path)] == [6, 9]


def test_publishing_a_step_again_replaces_it(tmp_path: Path) -> None:
    checkpoints.publish(_stage(tmp_path, 3, 2.5), tmp_path)
    checkpoints.publish(_stage(tmp_path, 3, 1.0), tmp_path)
    (only,) = checkpoints.list_checkpoints(tmp_path)
    assert only.step == 3 and only.loss == 1.0


def test_no_folder_means_no_checkpoint(tmp_path: Path) -> None:
    assert checkpoints.latest(tmp_path / "missing") is None
