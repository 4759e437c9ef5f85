"""Helpers shared by the tests."""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from cli.client import parse_sse

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "core" / "samples" / "medical_qa_sample.jsonl"


def zip_bytes(members: dict[str, bytes]) -> bytes:
    """A zip archive in memory holding ``members`` (name -> bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def unrepeated_words(count: int, word: str = "word") -> str:
    """A long answer with no phrase said twice: the dataset stage drops answers that loop
    (core/repetition.py), so a test's long answer cannot be one word repeated."""
    return " ".join(f"{word}{i}" for i in range(count))


def tiny_dataset(path: Path, rows: int = 8) -> Path:
    lines = SAMPLE.read_text().splitlines()[:rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def recipe_spec(dataset: Path | str, **training: Any) -> dict[str, Any]:
    """The recipe's full config layout, pointed at the embedded model and a small dataset."""
    return {
        "model_config": {
            "base_model": "smollm2-135m-instruct",
            "finetuned_model": "smollm2-medical-test",
            "max_seq_length": 256,
            "dtype": None,
            "load_in_4bit": True,
        },
        "lora_config": {
            "r": 16,
            "target_modules": [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            "lora_alpha": 16,
            "lora_dropout": 0,
            "bias": "none",
            "use_gradient_checkpointing": True,
            "use_rslora": False,
            "use_dora": False,
            "loftq_config": None,
        },
        "training_dataset": {
            "name": str(dataset),
            "split": "train",
            "input_field": "prompt",
            # The tests' datasets are a few rows; the default of 16 is tested on its own
            # (tests/core/data/test_bad_rows.py).
            "min_examples": 1,
        },
        "training_config": {
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "warmup_steps": 1,
            "max_steps": 4,
            "num_train_epochs": 1,
            "learning_rate": 2e-3,
            "fp16": None,
            "bf16": None,
            "logging_steps": 1,
            "optim": "adamw_8bit",
            "weight_decay": 0.01,
            "lr_scheduler_type": "linear",
            "seed": 42,
            "output_dir": "outputs",
            **training,
        },
        "hugging_face_username": "medtune-tests",
    }


def wait_status(
    client: httpx.Client, job_id: str, statuses: set[str], timeout_s: float = 300
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job stayed {job['status']} past {timeout_s} s: {job}")
        time.sleep(0.3)


def sse(
    client: httpx.Client, path: str, headers: dict[str, str] | None = None
) -> Iterator[tuple[str | None, str, dict[str, Any]]]:
    """(id, event, data) triples of a Server-Sent Events stream."""
    with client.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in parse_sse(response.iter_lines()):
            yield event.id, event.event, event.data


def wait_steps(client: httpx.Client, job_id: str, steps: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get(f"/jobs/{job_id}").json()["steps_done"] < steps:
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not reach step {steps} in {timeout_s} s")
        time.sleep(0.2)
