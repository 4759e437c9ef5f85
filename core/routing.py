"""Route training jobs to a worker that can hold them, by estimated GPU memory.

GPU workers consume ``medtune.train.gpu<N>`` (N: whole GiB of their card) and announce
themselves in the job store; CPU workers consume ``medtune.train``. A job goes to the smallest
card that holds its estimate with a margin, and is refused when no live worker can hold it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from sqlmodel import Session, col, select

from core.embedded_model import EMBEDDED_MODEL_NAME, is_embedded
from core.errors import SpecError
from core.memory import MemoryEstimate, estimate, find_shape
from core.queue import TRAIN_QUEUE
from core.spec import JobSpec
from core.store.models import Worker, utcnow

MARGIN = 1.10  # the estimate is within about 7% of measured peaks (tests/core/test_memory.py)
LIVE_WITHIN = timedelta(minutes=5)


class GpuMemoryExceeded(SpecError):
    code = "gpu_memory_exceeded"


def config_dir(base_model: str, models_dir: Path) -> Path | None:
    """Where a model's config.json can be read without downloading anything."""
    if is_embedded(base_model):
        return models_dir / EMBEDDED_MODEL_NAME
    path = Path(base_model).expanduser()
    return path if path.is_dir() else None


def gpu_queue(memory_gib: float) -> str:
    return f"{TRAIN_QUEUE}.gpu{int(memory_gib)}"


def announce(
    session: Session, *, name: str, queue: str, gpu_name: str | None, gpu_memory_gib: float | None
) -> None:
    worker = session.get(Worker, name) or Worker(name=name, queue=queue)
    worker.queue, worker.gpu_name, worker.gpu_memory_gib = queue, gpu_name, gpu_memory_gib
    worker.last_seen = utcnow()
    session.add(worker)
    session.commit()


def live_workers(session: Session) -> Sequence[Worker]:
    return session.exec(select(Worker).where(col(Worker.last_seen) > utcnow() - LIVE_WITHIN)).all()


def route(
    spec: JobSpec, workers: Sequence[Worker], *, local_dir: Path | None = None
) -> tuple[str, MemoryEstimate | None]:
    """The queue for ``spec`` and its memory estimate (None where the model's shape is unknown)."""
    gpus = [w for w in workers if w.gpu_memory_gib]
    # A GPU worker, the one an estimate sizes, trains "auto" with Unsloth (engines.pick_engine).
    engine = "transformers" if spec.training.engine == "transformers" else "unsloth"
    shape = (
        None
        if is_embedded(spec.model.base_model) and local_dir is None
        else find_shape(spec.model.base_model, local_dir=local_dir)
    )
    needed = estimate(spec, shape, engine=engine) if shape else None
    if not gpus:
        return TRAIN_QUEUE, needed  # CPU workers (or none yet): the default queue
    if needed is None:
        return gpu_queue(max(w.gpu_memory_gib or 0 for w in gpus)), None
    fitting = sorted(
        w.gpu_memory_gib or 0 for w in gpus if (w.gpu_memory_gib or 0) >= needed.total_gib * MARGIN
    )
    if not fitting:
        largest = max(w.gpu_memory_gib or 0 for w in gpus)
        raise GpuMemoryExceeded(
            f"this job needs about {needed.total_gib:.1f} GiB of GPU memory "
            f"(weights {needed.weights_gib:.1f}, LoRA and optimizer {needed.lora_gib:.1f}, "
            f"activations {needed.activations_gib:.1f}) and the largest live worker has "
            f"{largest:.1f} GiB; lower per_device_train_batch_size or max_seq_length, or keep "
            "load_in_4bit on",
            field="training_config.per_device_train_batch_size",
        )
    return gpu_queue(fitting[0]), needed
