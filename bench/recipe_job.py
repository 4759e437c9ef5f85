"""The recipe's job on a GPU (issue 13): medtune's training steps beside the recipe's notebook,
and the whole job through `medtune up`, stage by stage.

Random weights of the Llama-3-8B shape with the real Llama 3 tokenizer (bench/gpu_train.py
make), the recipe's 2,000 rows and its config (4-bit base, LoRA r=16 on all 7 projections,
batch 2 x accumulation 4, packing off, AdamW 8-bit, lr 2e-4, linear schedule, 5 warm-up steps).

    python bench/recipe_job.py train MODEL_DIR DATA.jsonl --steps N [--layout steps|padded]
        [--cap-gib 15] [--checkpointing unsloth,false,auto]
        The service's data preparation, model load and trainer in this process, as a worker
        runs them; --cap-gib caps this process's CUDA memory (a T4 holds 15 GiB); one run per
        checkpointing variant on one kept base.
    python bench/recipe_job.py job MODEL_DIR DATA.jsonl --steps N [--jobs 2] [--port 8765]
        Starts `medtune up` on its embedded defaults (SQLite, SQLite broker) in a fresh
        MEDTUNE_HOME, POSTs the recipe's config N times one after the other, each once the one
        before ended (the first meets a freshly started worker, the next ones a worker that
        kept the base and the prepared data of the job before), and reports POST -> terminal
        wall time, GET /jobs/{id}'s stage_seconds, whether the base and the data were reused,
        and the trainer's own seconds per step.

Each prints JSON lines (and appends them to $BENCH_OUT if set). The notebook's side is
../shared/gpu/notebook_baseline.py, run in the same device run (bench/gpu_recipe_job.sh).
Steady seconds per step are taken as the notebook takes them: (t[last] - t[10]) / (n - 10).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def emit(record: dict[str, Any]) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if os.environ.get("BENCH_OUT"):
        with open(os.environ["BENCH_OUT"], "a") as fh:
            fh.write(line + "\n")


def recipe(
    model_dir: str, data: str, *, steps: int, cuda: bool = True, checkpointing: Any = None
) -> dict[str, Any]:
    """The recipe's config as a user POSTs it (on the CPU: no 4-bit, no 8-bit optimizer)."""
    return {
        "model_config": {
            "base_model": model_dir,
            "finetuned_model": "llama3-8b-medical-recipe",
            "max_seq_length": 2048,
            "dtype": None,
            "load_in_4bit": cuda,
        },
        "lora_config": {
            "r": 16,
            "target_modules": PROJECTIONS,
            "lora_alpha": 16,
            "lora_dropout": 0,
            "bias": "none",
            "use_gradient_checkpointing": ("unsloth" if cuda else True)
            if checkpointing is None
            else checkpointing,
            "use_rslora": False,
            "loftq_config": None,
        },
        "training_dataset": {"name": data},
        "training_config": {
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 4,
            "warmup_steps": 5,
            "max_steps": steps,
            "num_train_epochs": 1,
            "learning_rate": 2e-4,
            "logging_steps": 1,
            "optim": "adamw_8bit" if cuda else "adamw_torch",
            "weight_decay": 0.01,
            "lr_scheduler_type": "linear",
            "seed": 42,
        },
    }


def steady(times: list[float]) -> float | None:
    """Seconds per step after the first ten, as notebook_baseline.py measures them."""
    return (times[-1] - times[9]) / (len(times) - 10) if len(times) > 11 else None


class TimedSink:
    """A ListSink that also notes when each step's row arrived (the loss read syncs the GPU)."""

    def __init__(self) -> None:
        from core.training.sink import ListSink

        self.inner = ListSink()
        self.times: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if "loss" in values:
            self.times.append(time.perf_counter())
        self.inner.log(step, values)


def train(
    model_dir: str,
    data: str,
    *,
    steps: int,
    layout: str,
    cap_gib: float | None,
    checkpointing: list[Any] | None = None,
) -> None:
    """The worker's own stages in this process: prepare, load, train; once per checkpointing
    variant (``auto``: the worker's choice), the base loaded once and kept between them as a
    worker keeps it between jobs (so the second variant's load_s is a kept base's)."""
    import torch

    from core.pipeline import _prepare_data
    from core.spec import JobSpec
    from core.training import engines
    from core.training.checkpointing import step_tokens

    cuda = torch.cuda.is_available()
    if cap_gib and cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total)
    prepared = None
    for variant in checkpointing or [None]:
        asked = "unsloth" if variant == "auto" else variant
        spec = JobSpec.model_validate(
            recipe(model_dir, data, steps=steps, cuda=cuda, checkpointing=asked)
        )
        started = time.perf_counter()
        prepared = prepared or _prepare_data(spec, model_dir)
        prep_s = time.perf_counter() - started
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        loaded = engines.load(
            spec,
            model_dir,
            keep=True,
            skip_checkpointing=variant == "auto",
            step_tokens=lambda: step_tokens(spec, prepared.train),  # noqa: B023 (called now)
        )
        load_s = time.perf_counter() - started
        try:
            record = _train_once(spec, loaded, prepared, layout=layout)
        except torch.OutOfMemoryError as exc:
            record = {"error": f"out of memory: {str(exc)[:200]}"}
        finally:
            engines.give_back(loaded)
        emit(
            {
                "bench": "recipe_train",
                "stack": f"medtune trainer ({loaded.engine}), layout {layout}",
                "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                "cap_gib": cap_gib,
                "checkpointing_asked": variant,
                "checkpointing_trained": loaded.checkpointing,
                "examples": len(prepared.train),
                "prep_s": round(prep_s, 1),
                "load_s": round(load_s, 1),
                "notes": loaded.notes,
                **record,
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            }
        )


def _train_once(spec: Any, loaded: Any, prepared: Any, *, layout: str) -> dict[str, Any]:
    from core.training import trainer

    sink = TimedSink()
    out = Path(tempfile.mkdtemp(prefix="recipe-train-"))
    started = time.perf_counter()
    outcome = trainer.train(
        spec,
        loaded,
        prepared.train,
        output_dir=out,
        sink=sink,
        layout=layout,  # type: ignore[arg-type]
    )
    train_s = time.perf_counter() - started
    rows = sink.inner.rows
    per_step = steady(sink.times)
    return {
        "train_s": round(train_s, 1),
        "steps": outcome.steps,
        "first_step_s": round(sink.times[0] - started, 1) if sink.times else None,
        "steady_s_per_step": round(per_step, 3) if per_step else None,
        "tokens_per_s_median": round(
            statistics.median(r["tokens_per_second"] for r in rows[10:] or rows), 1
        ),
        "loss_first": round(rows[0]["loss"], 4),
        "loss_last": round(rows[-1]["loss"], 4),
    }


def _wait_up(client: Any, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"medtune up exited with {proc.returncode}")
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("medtune up did not answer in time")


def _one_job(client: Any, spec: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
    from bench.infer_ready import QUESTION, _stream  # it imports this module

    started = time.perf_counter()
    created = client.post("/jobs", json=spec)
    if created.status_code != 201:
        raise SystemExit(f"POST /jobs: {created.status_code} {created.text}")
    job_id = created.json()["id"]
    job: dict[str, Any] = {}
    while time.perf_counter() - started < timeout_s:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.1)
    wall = time.perf_counter() - started
    # Issue 14: the first streamed answer, timed from the poll that read `succeeded`.
    first_answer = (
        _stream(
            client,
            "/infer",
            {"job_id": job_id, "question": QUESTION, "max_new_tokens": 64, "stream": True},
            since=time.perf_counter(),
        )
        if job.get("status") == "succeeded"
        else None
    )
    rows = client.get(f"/jobs/{job_id}/metrics", params={"limit": 1000}).json().get("data", [])
    # The trainer's own rate per logging step: a full step holds 8 examples.
    step_s = [8 / r["samples_per_second"] for r in rows if r.get("samples_per_second")]
    return {
        "job": job_id,
        "status": job.get("status"),
        "error": job.get("error"),
        "post_to_terminal_s": round(wall, 1),
        "steps": job.get("steps_done"),
        "stage_seconds": job.get("stage_seconds"),
        "first_step_s": round(step_s[0], 2) if step_s else None,
        "steady_s_per_step_median": round(statistics.median(step_s[10:]), 3)
        if len(step_s) > 11
        else None,
        "peak_memory_gib": round(max(r.get("peak_memory_mb") or 0 for r in rows) / 1024, 2)
        if rows
        else None,
        # What the worker kept from the job before (issue 13): the base and the prepared data.
        "base_reused": any(n.startswith("base model reused") for n in job.get("notes") or []),
        "data_reused": any(n.startswith("prepared data reused") for n in job.get("notes") or []),
        "goal_s": None,
        "first_answer": first_answer,
        "notes": job.get("notes"),
    }


def up_env(home: Path, model_dir: str, data: str) -> dict[str, str]:
    """The environment of a bench's `medtune up`: its own home, the model's and the data's
    folders allowed, no auth."""
    return {
        **os.environ,
        "MEDTUNE_HOME": str(home),
        "MEDTUNE_MODEL_ROOTS": json.dumps([str(Path(model_dir).resolve().parent)]),
        "MEDTUNE_DATA_ROOTS": json.dumps([str(Path(data).resolve().parent)]),
        "MEDTUNE_AUTH": "disabled",
    }


def job(model_dir: str, data: str, *, steps: int, jobs: int, port: int, timeout_s: float) -> None:
    """The whole job through `medtune up`, one job after another on one worker."""
    import httpx

    home = Path(tempfile.mkdtemp(prefix="medtune-home-"))
    env = up_env(home, model_dir, data)
    log = (home / "up.log").open("wb")
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "up", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    cuda = _has_cuda()
    spec = recipe(str(Path(model_dir).resolve()), str(Path(data).resolve()), steps=steps, cuda=cuda)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            _wait_up(client, proc, 120)
            emit({"bench": "recipe_job", "up_s": round(time.perf_counter() - started, 1)})
            for n in range(1, jobs + 1):
                record = _one_job(client, spec, timeout_s=timeout_s)
                # Issue 13's goals for the recipe's 250-step job, POST -> succeeded.
                record["goal_s"] = 220 if n == 1 else 150
                emit(
                    {
                        "bench": "recipe_job",
                        "run": n,
                        "worker": "fresh" if n == 1 else "warm",
                        "max_steps": steps,
                        **record,
                    }
                )
                if record["status"] not in ("succeeded", "failed", "cancelled"):
                    break  # the next job would queue behind this one: its time would mean nothing
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if os.environ.get("BENCH_LOG_DIR"):
            for name in ("up.log", "services.log"):  # services.log: the API's and workers'
                if (home / name).exists():
                    tail = (home / name).read_bytes()[-400_000:]
                    (Path(os.environ["BENCH_LOG_DIR"]) / name).write_bytes(tail)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cmd", choices=["train", "job"])
    parser.add_argument("model_dir")
    parser.add_argument("data")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--layout", choices=["steps", "padded"], default="steps")
    parser.add_argument("--cap-gib", type=float, default=None)
    parser.add_argument(
        "--checkpointing",
        default="unsloth",
        help="train: comma-separated variants run one after another on one kept base: "
        "unsloth, true, false (forced) or auto (the worker's choice for this card)",
    )
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--timeout-s", type=float, default=560)
    args = parser.parse_args()
    if args.cmd == "train":
        words = {"true": True, "false": False}
        checkpointing = [words.get(v, v) for v in args.checkpointing.split(",")]
        train(
            args.model_dir,
            args.data,
            steps=args.steps,
            layout=args.layout,
            cap_gib=args.cap_gib,
            checkpointing=checkpointing,
        )
    else:
        job(
            args.model_dir,
            args.data,
            steps=args.steps,
            jobs=args.jobs,
            port=args.port,
            timeout_s=args.timeout_s,
        )


if __name__ == "__main__":
    main()
