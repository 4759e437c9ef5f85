"""TensorBoard event files per job: every logged metric as a scalar, read with no server of ours.

``tensorboard --logdir $MEDTUNE_HOME/jobs`` shows every job's curves side by side. The files are
written with tensorboardX (a pure-Python writer needing only numpy and protobuf), not
``torch.utils.tensorboard``, which needs the whole TensorBoard server installed on the worker.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from core.training.sink import Values

TENSORBOARD_DIR = "tensorboard"

# Scalar tags, grouped the way TensorBoard lays out its cards.
TAGS = {
    "loss": "train/loss",
    "eval_loss": "eval/loss",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "tokens_per_second": "throughput/tokens_per_second",
    "samples_per_second": "throughput/samples_per_second",
    "eta_seconds": "throughput/eta_seconds",
    "memory_mb": "memory/allocated_mb",
    "reserved_memory_mb": "memory/reserved_mb",
    "peak_memory_mb": "memory/peak_mb",
}


def tag_for(name: str) -> str:
    return TAGS.get(name, f"other/{name}")


class TensorBoardSink:
    """Writes each logged value as a scalar at its step under ``log_dir``.

    ``resume_step``: the checkpoint a run resumes from. Steps after it were logged by the run
    that died, and are logged again now; TensorBoard drops the old ones (a purge marker at
    ``resume_step + 1``), so the curve has no doubled stretch.
    """

    def __init__(self, log_dir: Path, *, resume_step: int | None = None) -> None:
        from tensorboardX import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        self.writer: Any = SummaryWriter(
            str(log_dir),
            purge_step=resume_step + 1 if resume_step is not None else None,
            flush_secs=10,
            max_queue=100,
            # Readers load a folder's files in name order: a retry within the same second must
            # neither overwrite the lost run's file nor sort before it.
            filename_suffix=f".{time.time_ns()}",
        )

    def begin(self, total_steps: int) -> None:
        return None

    def log(self, step: int, values: Values) -> None:
        now = time.time()
        for name, value in values.items():
            if value is not None and name != "step":
                self.writer.add_scalar(tag_for(name), value, global_step=step, walltime=now)

    def flush(self) -> None:
        self.writer.flush()

    def should_stop(self) -> bool:
        return False

    def close(self) -> None:
        self.writer.close()
