"""Issue #14 on the GPU: how soon and how fast a tuned model answers, through the live API.

    python bench/infer_ready.py live MODEL_DIR DATA.jsonl [--steps 5] [--port 8766]
        Starts `medtune up` (embedded SQLite store and broker) in a fresh MEDTUNE_HOME, POSTs a
        short recipe job, polls GET /jobs/{id} every 50 ms and, the moment it reads
        `succeeded`, asks POST /infer (stream) and times its first delta from that moment
        (goal: < 3 s). Then asks every second (128 tokens, greedy) until the answers come from
        the fast path the worker builds itself (backend cuda_static), recording backend and
        decode tokens/s over time: the first answers are Unsloth for_inference, the later ones
        the fast path, in the same run. Then a sampled answer and a /v1/chat/completions
        stream. The worker's warm and fast-path log lines are in the record.
    python bench/infer_ready.py multi WORK_DIR [--adapters 8] [--tokens 48]
        In one process with Unsloth (as an inference worker): 8 questions to 8 adapters of one
        4-bit base, one after another vs all at once through the engine, and peft's
        mixed-adapter batch (one generate, each row its own adapter) under for_inference,
        checked against the one-by-one greedy answers.

    python bench/infer_ready.py multi-lora WORK_DIR [--adapters 8] [--tokens 64] [--four-bit]
        The batched multi-LoRA fast lane (core/inference/fast_multi.py) through the engine:
        builds the base's multi-LoRA model (bf16, or 4-bit) on the engine's CUDA-graph lane,
        fills its slots, then 8 questions to 8 adapters one after another (each a batch of
        one) vs all at once (one batch of 8), the same lane and graphs; checks that every
        concurrent answer equals its one-by-one answer token for token, and compares the
        first ``--reference`` adapters with peft's unmerged LoRA alone (eager, bf16).
        Goal: concurrent >= 3x sooner than one after another.

WORK_DIR is bench/infer_gpu.py make's (model, adapter, adapter_1 ...). JSON lines on stdout,
appended to $BENCH_OUT if set; bench/gpu_infer_ready.sh runs every part.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.recipe_job import emit, recipe

QUESTION = "What are the symptoms of iron deficiency anemia, and how is it treated?"


def _decode_rate(answer: dict[str, Any]) -> float | None:
    """Decode tokens/s: the tokens after the first over the time after the first."""
    n = answer.get("usage", {}).get("completion_tokens") or 0
    total, first = answer.get("generation_seconds"), answer.get("time_to_first_token_s")
    if n < 2 or not total or first is None or total <= first:
        return None
    return round((n - 1) / (total - first), 1)


def _stream(client: Any, path: str, body: dict[str, Any], since: float) -> dict[str, Any]:
    """POST a streaming request; seconds from ``since`` to its first text, and its end."""
    first = None
    done: dict[str, Any] = {}
    pieces = 0
    with client.stream("POST", path, json=body, timeout=300) as response:
        if response.status_code != 200:
            return {"status": response.status_code, "error": response.read().decode()[:500]}
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            data = json.loads(payload)
            text = data.get("text") or (data.get("choices") or [{}])[0].get("delta", {}).get(
                "content"
            )
            if text:
                pieces += 1
                first = first or time.perf_counter()
            if "answer" in data or "usage" in data:
                done = data
            elif "code" in data and "status" in data:  # an error event: a problem's fields
                done = {"error": data}
    return {
        "first_text_s": round(first - since, 3) if first else None,
        "end_s": round(time.perf_counter() - since, 3),
        "pieces": pieces,
        "backend": done.get("backend"),
        "usage": done.get("usage"),
        "error": done.get("error"),
    }


def _log_lines(home: Path) -> list[str]:
    log = home / "services.log"
    if not log.exists():
        return []
    keys = ("warm", "fast path", "preload", "loaded adapter", "Traceback", "Error")
    lines = log.read_text(errors="replace").splitlines()
    return [line[-300:] for line in lines if any(k in line for k in keys)][-40:]


def _ask(client: Any, job_id: str, **extra: Any) -> dict[str, Any]:
    body = {"job_id": job_id, "question": QUESTION, "max_new_tokens": 128, **extra}
    started = time.perf_counter()
    response = client.post("/infer", json=body, timeout=300)
    if response.status_code != 200:
        return {"status": response.status_code, "error": response.text[:500]}
    answer = response.json()
    return {
        "backend": answer.get("backend"),
        "tokens": answer["usage"]["completion_tokens"],
        "ttft_s": answer.get("time_to_first_token_s"),
        "decode_tokens_per_s": _decode_rate(answer),
        "latency_s": round(time.perf_counter() - started, 3),
    }


def _until_succeeded(client: Any, job_id: str, timeout_s: float) -> tuple[dict[str, Any], float]:
    deadline = time.perf_counter() + timeout_s
    job: dict[str, Any] = {}
    while time.perf_counter() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job, time.perf_counter()
        time.sleep(0.05)
    raise SystemExit(f"job {job_id} not finished in {timeout_s} s: {job.get('status')}")


def _wait_for(log: Path, text: bytes, proc: Any, timeout_s: float) -> None:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"medtune up exited with {proc.returncode}")
        if text in log.read_bytes():
            return
        time.sleep(0.5)
    raise SystemExit(f"medtune up did not log {text!r} in {timeout_s} s")


def live(model_dir: str, data: str, *, steps: int, port: int, fast_wait_s: float) -> None:
    import httpx

    from bench.recipe_job import _wait_up, up_env

    home = Path(tempfile.mkdtemp(prefix="medtune-ready-"))
    env = up_env(home, model_dir, data)
    log = (home / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "up", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    started = time.perf_counter()
    spec = recipe(str(Path(model_dir).resolve()), str(Path(data).resolve()), steps=steps)
    record: dict[str, Any] = {"bench": "infer_ready_live", "max_steps": steps}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            _wait_up(client, proc, 120)
            _wait_for(home / "up.log", b"is up", proc, 180)  # both workers ready too
            record["up_s"] = round(time.perf_counter() - started, 1)
            created = client.post("/jobs", json=spec)
            if created.status_code != 201:
                raise SystemExit(f"POST /jobs: {created.status_code} {created.text}")
            job_id = created.json()["id"]
            job, succeeded_at = _until_succeeded(client, job_id, 400)
            record["job_status"] = job["status"]
            if job["status"] != "succeeded":
                record["job_error"] = job.get("error")
                return
            # The first question, the moment the status reads succeeded.
            first = _stream(
                client,
                "/infer",
                {"job_id": job_id, "question": QUESTION, "max_new_tokens": 64, "stream": True},
                succeeded_at,
            )
            record["first_answer"] = first
            record["first_token_after_succeeded_s"] = first.get("first_text_s")
            record["stage_seconds"] = job.get("stage_seconds")
            emit({**record, "partial": True})
            answers = []
            deadline = time.perf_counter() + fast_wait_s
            while time.perf_counter() < deadline:
                answer = _ask(client, job_id)
                answer["t_after_succeeded_s"] = round(time.perf_counter() - succeeded_at, 1)
                answers.append(answer)
                if sum(a.get("backend") == "cuda_static" for a in answers) >= 3:
                    break
                time.sleep(1.0)
            record["answers"] = answers
            for backend in ("transformers", "cuda_static"):
                rates = [
                    a["decode_tokens_per_s"]
                    for a in answers
                    if a.get("backend") == backend and a.get("decode_tokens_per_s")
                ]
                record[f"{backend}_decode_tokens_per_s_median"] = (
                    statistics.median(rates) if rates else None
                )
            record["sampled"] = _ask(client, job_id, temperature=0.7, top_p=0.9)
            record["chat_stream"] = _stream(
                client,
                "/v1/chat/completions",
                {
                    "model": job_id,
                    "messages": [{"role": "user", "content": QUESTION}],
                    "max_tokens": 64,
                    "temperature": 0,
                    "stream": True,
                },
                time.perf_counter(),
            )
    finally:
        record["worker_log"] = _log_lines(home)
        emit(record)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if os.environ.get("BENCH_LOG_DIR") and (home / "services.log").exists():
            tail = (home / "services.log").read_bytes()[-400_000:]
            (Path(os.environ["BENCH_LOG_DIR"]) / "services.log").write_bytes(tail)


def multi(work: str, *, adapters: int, tokens: int) -> None:
    """8 adapters of one base: sequential vs concurrent, and peft's mixed batch under Unsloth."""
    os.environ["MEDTUNE_MODEL_ROOTS"] = json.dumps([str(Path(work).resolve())])
    import torch

    from core.inference.cuda import unsloth_available
    from core.inference.engine import InferenceEngine, InferenceRequest
    from core.inference.generate import GenerationRequest, generate_batch

    folders = [Path(work) / "adapter"] + [Path(work) / f"adapter_{n}" for n in range(1, adapters)]
    model = str((Path(work) / "model").resolve())
    engine = InferenceEngine(
        models_dir=Path(tempfile.mkdtemp()), max_batch=adapters, batch_wait_s=0.05, fast=False
    )
    record: dict[str, Any] = {
        "bench": "infer_ready_multi",
        "adapters": adapters,
        "max_new_tokens": tokens,
        "unsloth": unsloth_available(),
        "gpu": torch.cuda.get_device_name(0),
    }
    started = time.perf_counter()
    for folder in folders:
        engine.warm(model, adapter_dir=str(folder), adapter_name=folder.name).result()
    record["warm_s"] = round(time.perf_counter() - started, 1)

    def request(folder: Path) -> dict[str, Any]:
        return {
            "base_model": model,
            "messages": [{"role": "user", "content": QUESTION}],
            "adapter_dir": str(folder),
            "adapter_name": folder.name,
            "max_new_tokens": tokens,
        }

    started = time.perf_counter()
    one_by_one = [engine.answer(**request(folder)) for folder in folders]
    record["sequential_s"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    futures = [engine.submit(InferenceRequest(**request(folder))) for folder in folders]
    together = [f.result() for f in futures]
    record["concurrent_s"] = round(time.perf_counter() - started, 2)
    record["concurrent_batch_sizes"] = [a["batch_size"] for a in together]
    record["concurrent_same_answers"] = sum(
        a["answer"] == b["answer"] for a, b in zip(one_by_one, together, strict=True)
    )
    record["speedup"] = round(record["sequential_s"] / record["concurrent_s"], 2)
    emit({**record, "partial": True})
    # peft's mixed-adapter batch on the for_inference model itself: one generate, row i with
    # adapter i. Whether Unsloth's fast LoRA path honours adapter_names is what this checks.
    base = next(iter(engine._bases.values()))
    rows = [
        GenerationRequest(
            messages=[{"role": "user", "content": QUESTION}],
            max_new_tokens=tokens,
            adapter=folder.name,
        )
        for folder in folders
    ]
    try:
        started = time.perf_counter()
        mixed = generate_batch(base.model, base.tokenizer, rows)
        record["mixed_batch_s"] = round(time.perf_counter() - started, 2)
        record["mixed_batch_same_answers"] = sum(
            g.text == a["answer"] for g, a in zip(mixed, one_by_one, strict=True)
        )
    except Exception as exc:
        record["mixed_batch_error"] = f"{type(exc).__name__}: {exc}"[:400]
    emit(record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("live")
    one.add_argument("model_dir")
    one.add_argument("data")
    one.add_argument("--steps", type=int, default=5)
    one.add_argument("--port", type=int, default=8766)
    one.add_argument("--fast-wait-s", type=float, default=150)
    many = sub.add_parser("multi")
    many.add_argument("work")
    many.add_argument("--adapters", type=int, default=8)
    many.add_argument("--tokens", type=int, default=48)
    lora = sub.add_parser("multi-lora")
    lora.add_argument("work")
    lora.add_argument("--adapters", type=int, default=8)
    lora.add_argument("--tokens", type=int, default=64)
    lora.add_argument("--four-bit", action="store_true")
    lora.add_argument("--reference", type=int, default=2)
    args = parser.parse_args()
    if args.cmd == "multi-lora":
        from bench.infer_multi_lora import multi_lora

        multi_lora(
            args.work,
            adapters=args.adapters,
            tokens=args.tokens,
            four_bit=args.four_bit,
            reference=args.reference,
        )
        return
    if args.cmd == "live":
        live(
            args.model_dir,
            args.data,
            steps=args.steps,
            port=args.port,
            fast_wait_s=args.fast_wait_s,
        )
    else:
        multi(args.work, adapters=args.adapters, tokens=args.tokens)


if __name__ == "__main__":
    main()
