"""CPU inference benchmark: each backend, batching, adapter loads and the API's own overhead.

    .venv/bin/python bench/infer_bench.py [--gguf PATH] [--skip-api] [--tokens 128]

Prints one JSON line per measurement (and appends them to $BENCH_OUT if set):
- ``transformers_fp32`` / ``llama_cpp``: one stream, the embedded SmolLM2 answering a medical
  question, greedy: time to first token and decode tokens/s (median of 3, after a warm-up).
  ``--gguf`` names the GGUF (default: the wheel's Q4_1; a job's ``gguf/model-q4_k_m.gguf``).
- ``batched``: 4 concurrent requests through the engine's batcher vs the same 4 one by one.
- ``adapter``: first request to a job's adapter (loads it) vs the second (cached).
- ``api_overhead``: POST /infer through a live API + inference worker (Redis broker) vs the
  engine called in-process, same request (1 new token), p50 of 30; needs Redis on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = "smollm2-135m-instruct"
SYSTEM = "You are a helpful medical assistant."
QUESTIONS = [
    "What are the symptoms of iron deficiency anemia and how is it treated?",
    "How is type 2 diabetes diagnosed and managed?",
    "What causes high blood pressure and what are its risks?",
    "What should I know about the side effects of statins?",
]


def emit(record: dict[str, Any]) -> None:
    record["load_avg_1m"] = round(os.getloadavg()[0], 2)
    line = json.dumps(record)
    print(line, flush=True)
    if os.environ.get("BENCH_OUT"):
        with open(os.environ["BENCH_OUT"], "a") as fh:
            fh.write(line + "\n")


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def decode_rate(result: dict[str, Any]) -> float | None:
    """Tokens/s after the first token (the decode phase alone)."""
    n, total, first = (
        result["usage"]["completion_tokens"],
        result["generation_seconds"],
        result["time_to_first_token_s"],
    )
    return round((n - 1) / (total - first), 2) if n > 1 and total > first else None


def single_stream(
    engine: Any, name: str, *, tokens: int, extra: dict[str, Any] | None = None, **request: Any
) -> None:
    engine.answer(base_model=BASE, messages=messages("Hi"), max_new_tokens=8, **request)
    runs = [
        engine.answer(
            base_model=BASE, messages=messages(QUESTIONS[0]), max_new_tokens=tokens, **request
        )
        for _ in range(3)
    ]
    emit(
        {
            "bench": name,
            "backend": runs[0]["backend"],
            "new_tokens": [r["usage"]["completion_tokens"] for r in runs],
            "ttft_s_median": statistics.median(r["time_to_first_token_s"] for r in runs),
            "tokens_per_s_median": statistics.median(r["tokens_per_second"] for r in runs),
            "decode_tokens_per_s_median": statistics.median(decode_rate(r) or 0 for r in runs),
            **(extra or {}),
        }
    )


def batched(engine: Any, *, tokens: int) -> None:
    from core.inference.engine import InferenceRequest

    def request(question: str) -> InferenceRequest:
        return InferenceRequest(
            base_model=BASE,
            messages=messages(question),
            max_new_tokens=tokens,
            backend="transformers",
        )

    engine.submit(request("Hi")).result()  # the base model's load is not part of either side
    started = time.perf_counter()
    alone = [engine.submit(request(q)).result() for q in QUESTIONS]
    sequential_s = time.perf_counter() - started
    started = time.perf_counter()
    futures: list[Future[dict[str, Any]]] = [engine.submit(request(q)) for q in QUESTIONS]
    together = [f.result() for f in futures]
    batched_s = time.perf_counter() - started
    made = sum(r["usage"]["completion_tokens"] for r in together)
    emit(
        {
            "bench": "batched",
            "requests": len(QUESTIONS),
            "batch_sizes": [r["batch_size"] for r in together],
            "same_answers": [r["answer"] for r in together] == [r["answer"] for r in alone],
            "sequential_s": round(sequential_s, 2),
            "batched_s": round(batched_s, 2),
            "sequential_tokens_per_s": round(made / sequential_s, 2),
            "batched_tokens_per_s": round(made / batched_s, 2),
            "speedup": round(sequential_s / batched_s, 2),
        }
    )


def adapter_loads(models_dir: Path, workdir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from core.embedded_model import prepare_embedded_model
    from core.inference.engine import InferenceEngine

    adapter = workdir / "adapter"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(prepare_embedded_model(models_dir))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=targets)).save_pretrained(
        adapter
    )
    engine = InferenceEngine(models_dir=models_dir)
    engine.answer(
        base_model=BASE, messages=messages("Hi"), max_new_tokens=4, backend="transformers"
    )
    rows = []
    for attempt in ("first", "second"):
        started = time.perf_counter()
        result = engine.answer(
            base_model=BASE,
            messages=messages(QUESTIONS[1]),
            adapter_dir=str(adapter),
            adapter_name="job_bench",
            max_new_tokens=16,
        )
        rows.append((attempt, time.perf_counter() - started, result, dict(engine.loads)))
    for attempt, seconds, result, loads in rows:
        emit(
            {
                "bench": "adapter",
                "request": attempt,
                "latency_s": round(seconds, 3),
                "ttft_s": result["time_to_first_token_s"],
                "tokens_per_s": result["tokens_per_second"],
                "adapter_loads_so_far": loads.get("adapter", 0),
            }
        )


def _free_redis_db() -> str:
    import redis

    for db in range(15, 0, -1):
        client = redis.Redis.from_url(f"redis://127.0.0.1:6379/{db}")
        if client.dbsize() == 0 and client.set("medtune:bench-claim", os.getpid(), nx=True):
            return f"redis://127.0.0.1:6379/{db}"
    raise RuntimeError("no free Redis database")


def api_overhead(models_dir: Path, workdir: Path, *, llama_threads: int, samples: int = 30) -> None:
    import httpx
    import redis

    from cli.main import api_command, worker_command
    from core.embedded_model import gguf_path
    from core.inference.engine import InferenceEngine
    from core.queue import INFER_QUEUE
    from core.spec import JobSpec
    from core.store import jobs
    from core.store.db import session_scope
    from core.store.migrate import upgrade

    db_url = f"sqlite:///{workdir / 'jobs.db'}"
    upgrade(db_url)
    spec = JobSpec.model_validate(
        {"model_config": {"base_model": BASE}, "training_dataset": {"name": "sample:medical_qa"}}
    )
    with session_scope(db_url) as s:
        job_id = jobs.create_job(s, spec).id  # queued: its base model can be asked
    broker = _free_redis_db()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDTUNE_")}
    env.update(
        MEDTUNE_HOME=str(workdir),
        MEDTUNE_DATABASE_URL=db_url,
        MEDTUNE_BROKER_URL=broker,
        MEDTUNE_MODEL_CACHE=str(models_dir),
        MEDTUNE_AUTH="disabled",
        MEDTUNE_RATE_INFER_PER_MINUTE="0",
        # The worker would take every CPU (it serves only inference): the same count as the
        # in-process engine below, so the difference is the API's and the queue's alone.
        MEDTUNE_INFER_THREADS=str(llama_threads),
        HF_HUB_OFFLINE="1",
    )
    port = 18000 + os.getpid() % 1000
    logs = (workdir / "worker.log").open("wb")
    procs = [
        subprocess.Popen(
            worker_command(INFER_QUEUE, f"bench-{port}"),
            cwd=ROOT,
            env=env,
            stdout=logs,
            stderr=logs,
        ),
        subprocess.Popen(
            api_command("127.0.0.1", port), cwd=ROOT, env=env, stdout=logs, stderr=logs
        ),
    ]
    body = {"job_id": job_id, "question": QUESTIONS[0], "use_adapter": False, "max_new_tokens": 1}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if http.post("/infer", json=body).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the API + worker did not answer in 120 s")
                time.sleep(0.5)
            through_api = []
            backend = None
            for _ in range(samples):
                started = time.perf_counter()
                answer = http.post("/infer", json=body).json()
                through_api.append(time.perf_counter() - started)
                backend = answer["backend"]
        engine = InferenceEngine(models_dir=models_dir, llama_threads=llama_threads)
        request = {
            "base_model": BASE,
            "messages": [
                {"role": "system", "content": spec.dataset.system_prompt or SYSTEM},
                {"role": "user", "content": QUESTIONS[0]},
            ],
            "max_new_tokens": 1,
            "gguf_path": str(gguf_path()),  # as the worker asks the embedded base
        }
        engine.answer(**request)
        direct = []
        for _ in range(samples):
            started = time.perf_counter()
            engine.answer(**request)
            direct.append(time.perf_counter() - started)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
        redis.Redis.from_url(broker).flushdb()
    api_p50, direct_p50 = statistics.median(through_api), statistics.median(direct)
    emit(
        {
            "bench": "api_overhead",
            "backend": backend,
            "samples": samples,
            "llama_threads": llama_threads,
            "api_p50_ms": round(api_p50 * 1000, 2),
            "engine_p50_ms": round(direct_p50 * 1000, 2),
            "overhead_p50_ms": round((api_p50 - direct_p50) * 1000, 2),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", help="GGUF file (default: the embedded model's Q4_1)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument(
        "--llama-threads",
        type=int,
        help="default: half the usable CPUs (an inference-only worker would take them all)",
    )
    parser.add_argument("--skip-api", action="store_true")
    parser.add_argument("--only", choices=["streams", "llama", "batched", "adapter", "api"])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from core.embedded_model import gguf_path
    from core.inference.engine import InferenceEngine
    from core.settings import get_settings

    models_dir = get_settings().models_dir
    workdir = Path(tempfile.mkdtemp(prefix="medtune-infer-bench-"))
    engine = InferenceEngine(
        models_dir=models_dir,
        max_batch=len(QUESTIONS),
        batch_wait_s=0.05,
        llama_threads=args.llama_threads,
    )
    if args.only in (None, "streams"):
        single_stream(engine, "transformers_fp32", tokens=args.tokens, backend="transformers")
    if args.only in (None, "streams", "llama"):
        single_stream(
            engine,
            "llama_cpp",
            tokens=args.tokens,
            gguf_path=args.gguf or str(gguf_path()),
            extra={"threads": engine.llama.n_threads, "gguf": Path(args.gguf or gguf_path()).name},
        )
    if args.only in (None, "batched"):
        batched(engine, tokens=32)
    if args.only in (None, "adapter"):
        adapter_loads(models_dir, workdir)
    if args.only in (None, "api") and not args.skip_api:
        api_overhead(models_dir, workdir, llama_threads=engine.llama.n_threads)


if __name__ == "__main__":
    main()
