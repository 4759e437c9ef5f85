"""Training checkpoints on disk: written atomically, listed, pruned, found for resume.

A checkpoint is HF Trainer's folder (adapter, optimizer, scheduler, RNG and trainer state). It
is written into a staging folder and renamed into place, so a folder named ``checkpoint-N``
is always complete: a worker killed mid-save leaves only staging debris behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.spec import JobSpec

_NAME = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    created_at: datetime
    loss: float | None


def checkpoint_dir(output_dir: Path) -> Path:
    """Where a training run's checkpoints live, under its output folder."""
    return output_dir / "checkpoints"


def for_job(artifacts_dir: str | None, spec: dict[str, Any]) -> list[Checkpoint]:
    """A job's complete checkpoints, from its artifacts folder and its stored spec."""
    if not artifacts_dir:
        return []
    output_dir = JobSpec.model_validate(spec).training.output_dir
    return list_checkpoints(checkpoint_dir(Path(artifacts_dir) / output_dir))


def publish(staged: Path, root: Path) -> Path:
    """Move a fully written checkpoint folder into ``root`` with one atomic rename."""
    target = root / staged.name
    if target.exists():  # the same step saved again (a resumed run): replace it
        shutil.rmtree(target)
    os.replace(staged, target)
    return target


def list_checkpoints(root: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if not match or not path.is_dir():
            continue
        found.append(
            Checkpoint(
                step=int(match.group(1)),
                path=path,
                created_at=datetime.fromtimestamp(path.stat().st_mtime, UTC),
                loss=_last_loss(path),
            )
        )
    return sorted(found, key=lambda c: c.step)


def latest(root: Path) -> Checkpoint | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune(root: Path, *, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old.path, ignore_errors=True)


def _last_loss(path: Path) -> float | None:
    try:
        history = json.loads((path / "trainer_state.json").read_text())["log_history"]
    except (OSError, ValueError, KeyError):
        return None
    losses = [h["loss"] for h in history if "loss" in h]
    return float(losses[-1]) if losses else None
