"""The demo client: submit a job on the shipped sample, follow it live, compare base vs tuned."""

from __future__ import annotations

import sys
import time
from typing import Any

from cli.client import ApiError, MedtuneClient, ServerUnreachable
from cli.progress import Progress

DEMO_QUESTIONS = [
    "What are the early symptoms of type 2 diabetes?",
    "How can I lower my risk of a stroke?",
]


def demo_spec(max_steps: int) -> dict[str, Any]:
    return {
        "model_config": {
            "base_model": "smollm2-135m-instruct",
            "finetuned_model": "smollm2-135m-medical-demo",
            "max_seq_length": 384,
            "load_in_4bit": False,
        },
        "lora_config": {"r": 16, "lora_alpha": 32, "use_gradient_checkpointing": False},
        "training_dataset": {"name": "sample:medical_qa"},
        "training_config": {
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "max_steps": max_steps,
            "warmup_steps": 3,
            "learning_rate": 1e-3,
            "optim": "adamw_torch",
        },
    }


def run_demo(*, url: str, max_steps: int) -> int:
    out = sys.stdout
    with MedtuneClient(url) as client:
        try:
            client.wait_healthy()
        except ServerUnreachable as exc:
            raise SystemExit(f"the API at {url} did not come up: {exc.reason}") from exc
        try:
            job = client.create_job(demo_spec(max_steps))
        except ApiError as exc:
            print(f"job rejected: {exc.code}: {exc.detail}", file=out)
            return 1
        print(
            f"job {job['id']} queued: {job['base_model']} on sample:medical_qa, {max_steps} steps",
            file=out,
            flush=True,
        )
        started = time.monotonic()
        bar = Progress(out)
        for event in client.events(job["id"]):
            if event.event == "status":
                bar.status(event.data)
            elif event.event == "metric":
                bar.metric(event.data)
        bar.close()
        job = client.get_job(job["id"])
        print(f"job {job['status']} in {time.monotonic() - started:.0f} s", file=out)
        if job["status"] != "succeeded":
            print(f"error: {job.get('error')}", file=out)
            return 1
        for question in DEMO_QUESTIONS:
            print(f"\nQ: {question}", file=out)
            for label, use_adapter in (("base ", False), ("tuned", True)):
                try:
                    answer = client.infer(
                        job["id"], question, use_adapter=use_adapter, max_new_tokens=120
                    )
                except ApiError as exc:
                    print(f"  {label}: error {exc.code}: {exc.detail}", file=out)
                    return 1
                print(f"  {label}: {answer['answer']}", file=out, flush=True)
    return 0
