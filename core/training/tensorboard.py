"""TensorBoard event files per job: every logged metric as a scalar, read with no server of ours.

``tensorboard --logdir $MEDTUNE_HOME/jobs`` shows every job's curves side by side. The files are
written with tensorboardX (a pure-Python writer needing only numpy and protobuf), not
``torch.utils.tensorboard``, which needs the whole TensorBoard server installed on the worker.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from core.training.sink import BufferedSink

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


class TensorBoardSink(BufferedSink):
    """Writes each logged value as a scalar at its step under ``log_dir``.

    One event per step holds all of that step's scalars, written in batches by the sink's
    writer thread (BufferedSink), so the training loop does not build protobufs.

    ``resume_step``: the checkpoint a run resumes from (0 for a fresh start). Steps after it
    may have been logged by a run that died, and are logged again now; TensorBoard drops the
    old ones (a purge marker at ``resume_step + 1``), so the curve has no doubled stretch.
    """

    def __init__(self, log_dir: Path, *, resume_step: int, max_seconds: float = 2.0) -> None:
        from tensorboardX import FileWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        super().__init__(max_seconds=max_seconds)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.writer: Any = FileWriter(
            str(log_dir),
            max_queue=100,
            flush_secs=10,
            # Readers load a folder's files in name order: a retry within the same second must
            # neither overwrite the lost run's file nor sort before it.
            filename_suffix=f".{time.time_ns()}",
        )
        # What SummaryWriter(purge_step=...) writes: readers drop the steps from here on that
        # earlier files hold.
        self.writer.add_event(
            Event(step=resume_step + 1, session_log=SessionLog(status=SessionLog.START))
        )

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        from tensorboardX.proto.summary_pb2 import Summary

        for row in rows:
            values = [
                Summary.Value(tag=tag_for(name), simple_value=float(value))
                for name, value in row.items()
                if name not in ("step", "created_at") and value is not None
            ]
            if values:
                self.writer.add_summary(
                    Summary(value=values), row["step"], row["created_at"].timestamp()
                )

    def flush(self) -> None:
        super().flush()
        self.writer.flush()

    def close(self) -> None:
        super().close()
        self.writer.close()
