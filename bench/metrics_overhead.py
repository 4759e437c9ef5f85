"""What the metrics path costs per training step, against real step times.

1. A real step time: SmolLM2-135M-Instruct (the embedded model) trained on the shipped sample
   through the service's trainer on this machine (median of the steps after the first two).
2. The metrics path per step, as the trainer drives it: throughput/ETA and memory read-outs,
   ``log`` into the job's production sink (the job store in batches + TensorBoard event
   files) and the cancel poll, over many steps, flushes included. Also the same with a
   database write and a cancel read on every step (what the path did before batching).
3. Both as a share of the CPU step and of the GPU step times measured in BENCHMARKS.md.

    .venv/bin/python bench/metrics_overhead.py [--database-url URL] [--steps 2000]
    python bench/metrics_overhead.py --gpu-model DIR   # on a CUDA machine, see below

The default database is a temporary SQLite file (the embedded default); pass a migrated
Postgres URL for the production store. With ``--gpu-model`` (a Llama-shaped model folder,
e.g. from ../shared/gpu/probe.py) the real step is a QLoRA step of that model on the GPU
(Unsloth where installed) with a held-out split, so the eval loss and the CUDA memory
read-outs (allocated / reserved / peak) run there too; ``--no-tensorboard`` where
tensorboardX is not installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

# Optimizer-step times on the H200 (BENCHMARKS.md, "GPU training"): batch 2 x 2048 tokens,
# no accumulation, service trainer with Unsloth.
GPU_STEPS_S = {
    "H200 Llama-3-8B (9,555.6 tokens/s)": 4096 / 9555.6,
    "H200 Llama-3.2-1B shape (26,439.7 tokens/s)": 4096 / 26439.7,
}


class TimedSink:
    """Records when each step was logged (a ListSink with a clock)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def begin(self, total_steps: int) -> None:
        return None

    def log(self, step: int, values: dict[str, float | None]) -> None:
        if values.get("loss") is not None:
            self.times.append(time.perf_counter())

    def flush(self) -> None:
        return None

    def should_stop(self) -> bool:
        return False


def gpu_step(model_dir: str, *, steps: int, bs: int, seq: int) -> tuple[float, list[Any]]:
    """Median optimizer-step time of a QLoRA run on the GPU, and its metric rows."""
    import random

    from core.data.tokenize import Encoded
    from core.spec import JobSpec
    from core.training import engines, trainer
    from core.training.sink import ListSink, TeeSink

    spec = JobSpec.model_validate(
        {
            "model_config": {"base_model": model_dir, "max_seq_length": seq},
            "training_config": {
                "per_device_train_batch_size": bs,
                "gradient_accumulation_steps": 1,
                "max_steps": steps,
                "save_steps": 0,
                "eval_steps": max(1, steps // 3),
            },
        }
    )
    loaded = engines.load(spec, model_dir)
    rng = random.Random(1)
    vocab = len(loaded.tokenizer)
    rows = [[rng.randrange(10, vocab - 10) for _ in range(seq)] for _ in range(steps * bs + 4)]
    items = [Encoded(ids, ids, False) for ids in rows]
    rows_sink, timed = ListSink(), TimedSink()
    with tempfile.TemporaryDirectory() as out:
        trainer.train(
            spec,
            loaded,
            items[:-4],
            output_dir=Path(out),
            sink=TeeSink(rows_sink, timed),
            eval_items=items[-4:],
        )
    gaps = [b - a for a, b in zip(timed.times, timed.times[1:], strict=False)]
    # Steps with an evaluation are longer; the median is a plain training step.
    return statistics.median(gaps[1:]), rows_sink.rows


def cpu_step_seconds(steps: int) -> float:
    from core.data.conversations import to_examples
    from core.data.sources import load_rows
    from core.data.tokenize import encode_all
    from core.embedded_model import EMBEDDED_MODEL_NAME, prepare_embedded_model
    from core.settings import get_settings
    from core.spec import DatasetSection, JobSpec
    from core.training import engines, trainer

    cache = get_settings().models_dir
    prepare_embedded_model(cache)
    model_dir = str(cache / EMBEDDED_MODEL_NAME)
    spec = JobSpec.model_validate(
        {
            "model_config": {"base_model": model_dir, "max_seq_length": 512},
            "training_config": {
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 1,
                "max_steps": steps,
                "save_steps": 0,
            },
        }
    )
    loaded = engines.load(spec, model_dir)
    section = DatasetSection(name="sample:medical_qa")
    rows = load_rows(section)
    examples = to_examples(
        rows, system_prompt=section.system_prompt, input_field=section.input_field
    ).examples
    items = encode_all(loaded.tokenizer, examples, max_length=512).items
    sink = TimedSink()
    with tempfile.TemporaryDirectory() as out:
        trainer.train(spec, loaded, items, output_dir=Path(out), sink=sink)
    gaps = [b - a for a, b in zip(sink.times, sink.times[1:], strict=False)]
    return statistics.median(gaps[1:])


def _running_job(url: str) -> str:
    from core.spec import JobSpec
    from core.store import jobs
    from core.store.db import session_scope
    from core.store.migrate import upgrade

    upgrade(url)
    with session_scope(url) as s:
        job_id = jobs.create_job(s, JobSpec()).id
        jobs.claim(s, job_id, worker="bench")
    return job_id


def path_seconds_per_step(
    url: str, steps: int, *, batched: bool, tensorboard: bool = True
) -> float:
    """Mean cost of one step's metrics path: read-outs, log, cancel poll (flushes included)."""
    from core.job_metrics import DatabaseSink
    from core.training.meter import StepMeter, memory_mb
    from core.training.sink import TeeSink
    from core.training.tensorboard import TensorBoardSink

    job_id = _running_job(url)
    database = (
        DatabaseSink(url, job_id)
        if batched
        else DatabaseSink(url, job_id, max_rows=1, cancel_poll_s=0)
    )
    with tempfile.TemporaryDirectory() as tb:
        events = [TensorBoardSink(Path(tb), resume_step=0)] if tensorboard else []
        sink = TeeSink(database, *events)
        sink.begin(steps)
        meter = StepMeter()
        meter.start(step=0, tokens=0, samples=0)
        started = time.perf_counter()
        for step in range(1, steps + 1):
            allocated, reserved, peak = memory_mb()
            values: dict[str, Any] = {
                "loss": 2.0 - step * 1e-4,
                "learning_rate": 2e-4,
                "grad_norm": 0.5,
                "epoch": step / steps,
                **meter.row(step=step, total_steps=steps, tokens=step * 900, samples=step * 2),
                "memory_mb": allocated,
                "reserved_memory_mb": reserved,
                "peak_memory_mb": peak,
            }
            sink.log(step, values)
            sink.should_stop()
        sink.flush()
        elapsed = time.perf_counter() - started
        sink.close()
    return elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", help="a Postgres URL; default: temporary SQLite")
    parser.add_argument("--steps", type=int, default=2000, help="simulated logging steps")
    parser.add_argument("--train-steps", type=int, default=8, help="real training steps")
    parser.add_argument("--gpu-model", help="a model folder to train on the GPU instead")
    parser.add_argument("--no-tensorboard", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{tmp}/bench.db"
        tb = not args.no_tensorboard
        batched = path_seconds_per_step(url, args.steps, batched=True, tensorboard=tb)
        unbatched = path_seconds_per_step(url, min(args.steps, 500), batched=False, tensorboard=tb)
    result: dict[str, Any] = {
        "database": url.split(":", 1)[0] if args.database_url else "sqlite (temporary file)",
        "tensorboard": tb,
        "metrics_path_us_per_step": {
            "batched": round(batched * 1e6, 1),
            "every_step_written": round(unbatched * 1e6, 1),
        },
    }
    steps_s = dict(GPU_STEPS_S)
    if args.gpu_model:
        import torch

        step, rows = gpu_step(args.gpu_model, steps=args.train_steps, bs=2, seq=2048)
        name = f"{torch.cuda.get_device_name(0)} {Path(args.gpu_model).name} (measured now)"
        result["gpu_rows"] = rows
    else:
        step = cpu_step_seconds(args.train_steps)
        name = "CPU SmolLM2-135M (measured now)"
    result["measured_step_s"] = round(step, 4)
    steps_s = {name: step, **steps_s}
    result["share_of_step_percent"] = {
        label: {
            "batched": round(100 * batched / seconds, 4),
            "every_step_written": round(100 * unbatched / seconds, 4),
        }
        for label, seconds in steps_s.items()
    }
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
