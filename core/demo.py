"""The demo client: submit a job on the shipped sample, follow it live, compare base vs tuned."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx

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


def wait_healthy(client: httpx.Client, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the API at {client.base_url} did not come up in {timeout_s:.0f} s")
        time.sleep(0.5)


def sse_events(client: httpx.Client, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Parse a Server-Sent Events stream into (event, data) pairs."""
    with client.stream("GET", path, timeout=httpx.Timeout(10, read=600)) as response:
        response.raise_for_status()
        event, data = "message", []
        for line in response.iter_lines():
            if not line:
                if data:
                    yield event, json.loads("\n".join(data))
                event, data = "message", []
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())


def _progress(row: dict[str, Any], total: int | None) -> str:
    tps = row.get("tokens_per_second") or 0
    return (
        f"  step {row['step']:>4}/{total or '?'}  loss {row['loss']:.4f}  "
        f"lr {row.get('learning_rate') or 0:.2e}  {tps:,.0f} tokens/s"
    )


def run_demo(*, url: str, max_steps: int) -> int:
    out = sys.stdout
    with httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=600)) as client:
        wait_healthy(client)
        created = client.post("/jobs", json=demo_spec(max_steps))
        if created.status_code != 201:
            print(f"job rejected: {created.text}", file=out)
            return 1
        job = created.json()
        print(
            f"job {job['id']} queued: {job['base_model']} on sample:medical_qa, {max_steps} steps",
            file=out,
            flush=True,
        )
        total: int | None = None
        started = time.monotonic()
        for event, data in sse_events(client, f"/jobs/{job['id']}/events"):
            if event == "status":
                total = data.get("steps_total") or total
                print(
                    f"  [{data['status']}{' / ' + data['stage'] if data.get('stage') else ''}]",
                    file=out,
                    flush=True,
                )
            elif event == "metric":
                print(_progress(data, total), file=out, flush=True)
        job = client.get(f"/jobs/{job['id']}").json()
        print(f"job {job['status']} in {time.monotonic() - started:.0f} s", file=out)
        if job["status"] != "succeeded":
            print(f"error: {job.get('error')}", file=out)
            return 1
        for question in DEMO_QUESTIONS:
            print(f"\nQ: {question}", file=out)
            for label, use_adapter in (("base ", False), ("tuned", True)):
                reply = client.post(
                    "/infer",
                    json={
                        "job_id": job["id"],
                        "question": question,
                        "use_adapter": use_adapter,
                        "max_new_tokens": 120,
                    },
                )
                if reply.status_code != 200:
                    print(f"  {label}: error {reply.text}", file=out)
                    return 1
                answer = reply.json()
                print(f"  {label}: {answer['answer']}", file=out, flush=True)
    return 0
