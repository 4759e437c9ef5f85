"""Soak: many clients read a job's metrics while it trains; does training slow down?

Starts its own stack on the local Postgres and Redis (a fresh database and a free Redis
database, both removed at the end): the API (uvicorn, keys required) and one training worker
(Celery, SmolLM2-135M on the CPU). It submits a long job and, once the job trains, measures in
three windows:

    quiet   --quiet-s seconds, no client but this script
    load    --load-s seconds: --pollers clients each GET /jobs/{id}/metrics?after_step=<last>
            every --interval s (their own connection each), and --sse clients streaming
            GET /jobs/{id}/events
    quiet   --quiet-s seconds again (the machine may drift; the two quiet windows bracket load)

and reports: errors (any non-200, transport error or SSE stream that broke), poll latency
p50/p99/max, requests/s, SSE events received, the training step time per window (median of the
intervals between consecutive metric rows, timestamped by the worker), and the CPU seconds the
API, the worker and this load generator used per window (/proc). With --pin the API and this
script run on CPU 0 and the worker on CPU 1 (taskset / sched_setaffinity); --api-cpus and
--worker-cpus give other sets (taskset lists such as 0-3). --spec runs another job, e.g. a GPU
job on a GPU host (bench/gpu_soak.sh), instead of the SmolLM2 CPU job.

    python bench/load_soak.py [--pin] [--pollers 200] [--sse 50] [--load-s 60] [--out FILE]
    python bench/load_soak.py --spec JOB.json --api-cpus 0-3 --worker-cpus 4-15
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from cli.main import api_command, worker_command
from core import auth
from core.embedded_model import prepare_embedded_model
from core.store.db import session_scope
from core.store.migrate import upgrade

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("MEDTUNE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_SERVER = os.environ.get("MEDTUNE_SOAK_REDIS", "redis://127.0.0.1:6379")
TICKS = os.sysconf("SC_CLK_TCK")
# One TLS context for every client (the URLs are plain http): building one per client costs
# the load generator CPU that the API and the worker would otherwise have.
TLS = ssl.create_default_context()


def job_spec(max_steps: int) -> dict[str, Any]:
    """SmolLM2 on the shipped sample, one optimizer step per metric row, no checkpoints."""
    return {
        "model_config": {
            "base_model": "smollm2-135m-instruct",
            "finetuned_model": "smollm2-soak",
            "max_seq_length": 256,
            "load_in_4bit": False,
        },
        "lora_config": {"use_gradient_checkpointing": False},
        "training_dataset": {"name": "sample:medical_qa"},
        "training_config": {
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "max_steps": max_steps,
            "warmup_steps": 2,
            "learning_rate": 2e-4,
            "optim": "adamw_torch",
            "logging_steps": 1,
            "save_steps": 0,
        },
    }


# --- the stack ---------------------------------------------------------------------------------


@dataclass
class Stack:
    url: str
    home: Path
    db_url: str
    redis_url: str
    db_name: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], env: dict[str, str], cpus: str | None) -> None:
        if cpus is not None:
            argv = ["taskset", "-c", cpus, *argv]
        log = (self.home / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )

    def tail(self, name: str, lines: int = 30) -> str:
        text = (self.home / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def claim_redis_db() -> str:
    for db in range(1, 16):
        client = redis.Redis.from_url(f"{REDIS_SERVER}/{db}")
        # Claimed only if empty: a database in use by anyone else has keys in it.
        if client.dbsize() == 0 and client.set("medtune:soak-claim", os.getpid(), nx=True):
            return f"{REDIS_SERVER}/{db}"
    raise SystemExit("no free Redis database (1-15) on 127.0.0.1:6379")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_list(spec: str) -> set[int]:
    """A taskset list such as ``0-3,8`` as a set of CPU numbers."""
    cpus: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def start_stack(api_cpus: str | None, worker_cpus: str | None, embedded: bool) -> Stack:
    name = f"medtune_soak_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    db_url = f"{base}/{name}"
    upgrade(db_url)
    port = free_port()
    stack = Stack(
        url=f"http://127.0.0.1:{port}",
        home=Path(tempfile.mkdtemp(prefix="medtune-soak-")),
        db_url=db_url,
        redis_url=claim_redis_db(),
        db_name=name,
    )
    cache = Path(os.environ.get("MEDTUNE_MODEL_CACHE", ROOT / ".medtune" / "models"))
    if embedded:
        prepare_embedded_model(cache)
    # The stack's settings are this script's, except where the caller confines data and models.
    kept = ("MEDTUNE_DATA_ROOTS", "MEDTUNE_MODEL_ROOTS")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDTUNE_") or k in kept}
    env.update(
        MEDTUNE_HOME=str(stack.home),
        MEDTUNE_MODEL_CACHE=str(cache),
        MEDTUNE_DATABASE_URL=db_url,
        MEDTUNE_BROKER_URL=stack.redis_url,
        MEDTUNE_AUTH="required",
        MEDTUNE_RATE_JOBS_PER_MINUTE="0",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    stack.start("worker", worker_command("medtune.train", f"soak-{port}"), env, worker_cpus)
    stack.start("api", api_command("127.0.0.1", port), env, api_cpus)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        with suppress(httpx.TransportError):
            if httpx.get(f"{stack.url}/healthz", timeout=2).status_code == 200:
                return stack
        if any(p.poll() is not None for p in stack.procs.values()):
            break
        time.sleep(0.5)
    stack.stop()
    raise SystemExit("the API did not come up:\n" + stack.tail("api") + stack.tail("worker"))


def remove_stack(stack: Stack) -> None:
    stack.stop()
    from core.store.db import get_engine

    get_engine(stack.db_url).dispose()
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{stack.db_name}" WITH (FORCE)')
    redis.Redis.from_url(stack.redis_url).flushdb()  # the database this script claimed


# --- measuring ---------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its waited-for children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + cutime + cstime) / TICKS


def all_cpu(stack: Stack) -> dict[str, float]:
    return {
        "api": cpu_seconds(stack.procs["api"].pid),
        "worker": cpu_seconds(stack.procs["worker"].pid),
        "load_generator": cpu_seconds(os.getpid()),
    }


def step_times(db_url: str, job_id: str) -> list[tuple[float, float, float | None]]:
    """(end time, seconds, tokens/s) of each optimizer step: the worker's metric row timestamps,
    and the trainer's own throughput for the step (which, unlike the seconds, does not follow
    how long the step's rows happen to be)."""
    from sqlmodel import col, select

    from core.store.models import MetricRow

    with session_scope(db_url) as s:
        rows = s.exec(
            select(MetricRow).where(MetricRow.job_id == job_id).order_by(col(MetricRow.step))
        ).all()
    out = []
    for before, after in pairwise(rows):
        if after.step == before.step + 1:
            out.append(
                (
                    after.created_at.timestamp(),
                    (after.created_at - before.created_at).total_seconds(),
                    after.tokens_per_second,
                )
            )
    return out


def window_stats(
    times: list[tuple[float, float, float | None]], start: float, end: float
) -> dict[str, Any]:
    # A step counts for the window it both started and ended in.
    inside = [(d, tps) for t, d, tps in times if t - d >= start and t <= end]
    if not inside:
        return {"steps": 0}
    rates = [tps for _, tps in inside if tps]
    return {
        "steps": len(inside),
        "median_s": round(statistics.median(d for d, _ in inside), 4),
        "mean_s": round(statistics.fmean(d for d, _ in inside), 4),
        "median_tokens_per_s": round(statistics.median(rates), 1) if rates else None,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sse_events: int = 0
    sse_metric_events: int = 0
    sse_streams_open_at_end: int = 0


async def poller(
    base: str,
    headers: dict[str, str],
    job_id: str,
    *,
    after: int,
    until: float,
    interval: float,
    out: LoadResult,
) -> None:
    """One client: its own connection, polling for rows after the last step it saw."""
    last = after
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30, verify=TLS) as client:
        # Spread the clients over the first interval, as independent clients would be.
        await asyncio.sleep(random.uniform(0, interval))
        while time.monotonic() < until:
            started = time.perf_counter()
            try:
                response = await client.get(
                    f"/jobs/{job_id}/metrics", params={"after_step": last, "limit": 100}
                )
            except httpx.HTTPError as exc:
                out.errors.append(f"poll: {exc!r}")
            else:
                out.latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    out.errors.append(f"poll: {response.status_code} {response.text[:200]}")
                else:
                    seen = response.json()["last_step"]
                    last = last if seen is None else seen
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - started)))


async def listener(
    base: str, headers: dict[str, str], job_id: str, *, after: int, until: float, out: LoadResult
) -> None:
    """One SSE client, from the current step on, until the window closes."""
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=None, verify=TLS) as c:
        try:
            async with asyncio.timeout(until - time.monotonic()):
                params = {"after_step": after}
                async with c.stream("GET", f"/jobs/{job_id}/events", params=params) as r:
                    if r.status_code != 200:
                        out.errors.append(f"sse: {r.status_code}")
                        return
                    async for line in r.aiter_lines():
                        if line.startswith("event:"):
                            out.sse_events += 1
                            out.sse_metric_events += line.split(":", 1)[1].strip() == "metric"
            out.errors.append("sse: the stream ended before the window closed")
        except TimeoutError:
            out.sse_streams_open_at_end += 1  # open until the window closed, as it should be
        except httpx.HTTPError as exc:
            out.errors.append(f"sse: {exc!r}")


async def run_load(
    base: str,
    key: str,
    job_id: str,
    *,
    after: int,
    pollers: int,
    sse: int,
    seconds: float,
    interval: float,
) -> LoadResult:
    out = LoadResult()
    headers = {"Authorization": f"Bearer {key}"}
    until = time.monotonic() + seconds
    tasks = [
        poller(base, headers, job_id, after=after, until=until, interval=interval, out=out)
        for _ in range(pollers)
    ]
    tasks += [
        listener(base, headers, job_id, after=after, until=until, out=out) for _ in range(sse)
    ]
    await asyncio.gather(*tasks)
    return out


def wait_training(client: httpx.Client, job_id: str, min_step: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("failed", "cancelled", "succeeded"):
            raise SystemExit(f"job ended early: {job}")
        if job["steps_done"] >= min_step:
            return
        time.sleep(1)
    raise SystemExit(f"job {job_id} did not reach step {min_step} in {timeout_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pin", action="store_true", help="API + load on CPU 0, worker on 1")
    parser.add_argument("--api-cpus", help="taskset list for the API and the load generator")
    parser.add_argument("--worker-cpus", help="taskset list for the training worker")
    parser.add_argument("--spec", type=Path, help="JSON job spec (default: SmolLM2 on the CPU)")
    parser.add_argument("--train-timeout-s", type=float, default=900)
    parser.add_argument("--pollers", type=int, default=200)
    parser.add_argument("--sse", type=int, default=50)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    parser.add_argument("--load-s", type=float, default=60)
    parser.add_argument("--quiet-s", type=float, default=45)
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.pin:
        args.api_cpus, args.worker_cpus = args.api_cpus or "0", args.worker_cpus or "1"
    if args.api_cpus:
        os.sched_setaffinity(0, cpu_list(args.api_cpus))
    spec = json.loads(args.spec.read_text()) if args.spec else job_spec(args.max_steps)
    embedded = spec["model_config"]["base_model"] == "smollm2-135m-instruct"
    load_before = os.getloadavg()
    stack = start_stack(args.api_cpus, args.worker_cpus, embedded)
    try:
        with session_scope(stack.db_url) as s:
            _, key = auth.create_key(s, name="soak")
        client = httpx.Client(
            base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        job = client.post("/jobs", json=spec)
        job.raise_for_status()
        job_id = job.json()["id"]
        wait_training(client, job_id, min_step=5, timeout_s=args.train_timeout_s)
        marks: dict[str, float] = {}
        cpu: dict[str, dict[str, float]] = {}

        def window(name: str, seconds: float, load: bool) -> LoadResult | None:
            before = all_cpu(stack)
            marks[name + "_start"] = time.time()
            result = None
            if load:
                current = client.get(f"/jobs/{job_id}").json()["steps_done"]
                result = asyncio.run(
                    run_load(
                        stack.url,
                        key,
                        job_id,
                        after=current,
                        pollers=args.pollers,
                        sse=args.sse,
                        seconds=seconds,
                        interval=args.interval,
                    )
                )
            else:
                time.sleep(seconds)
            marks[name + "_end"] = time.time()
            after = all_cpu(stack)
            cpu[name] = {k: round(after[k] - before[k], 2) for k in after}
            return result

        window("quiet_before", args.quiet_s, load=False)
        load = window("load", args.load_s, load=True)
        window("quiet_after", args.quiet_s, load=False)
        assert load is not None
        times = step_times(stack.db_url, job_id)
        steps = {
            name: window_stats(times, marks[name + "_start"], marks[name + "_end"])
            for name in ("quiet_before", "load", "quiet_after")
        }
        quiet = [steps[n]["median_s"] for n in ("quiet_before", "quiet_after") if steps[n]["steps"]]
        quiet_rates = [
            steps[n]["median_tokens_per_s"]
            for n in ("quiet_before", "quiet_after")
            if steps[n].get("median_tokens_per_s")
        ]
        loaded_rate = steps["load"].get("median_tokens_per_s")
        baseline = statistics.fmean(quiet) if quiet else None
        loaded = steps["load"].get("median_s")
        lat = load.latencies
        report = {
            "command": "python bench/load_soak.py " + " ".join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "hardware": {
                "cpus": os.cpu_count(),
                "cpu_model": _cpu_model(),
                "gpu": _gpu_name(),
                "python": platform.python_version(),
                "load_average_at_end": os.getloadavg(),
            },
            "cpus": {"api_and_load": args.api_cpus, "worker": args.worker_cpus},
            "job": {k: spec[k] for k in ("model_config", "training_config") if k in spec},
            "clients": {"pollers": args.pollers, "interval_s": args.interval, "sse": args.sse},
            "load_seconds": args.load_s,
            "errors": len(load.errors),
            "error_samples": load.errors[:10],
            "polls": len(lat),
            "polls_per_second": round(len(lat) / args.load_s, 1),
            "poll_latency_ms": {
                "p50": round(percentile(lat, 0.50) * 1000, 1),
                "p99": round(percentile(lat, 0.99) * 1000, 1),
                "max": round(max(lat) * 1000, 1),
            }
            if lat
            else None,
            "sse_events": load.sse_events,
            "sse_metric_events": load.sse_metric_events,
            "sse_streams_open_at_end": load.sse_streams_open_at_end,
            "step_time": steps,
            "step_slowdown_under_load": round(loaded / baseline - 1, 4)
            if (baseline and loaded)
            else None,
            # Tokens/s of the steps under load against the quiet windows': negative is slower.
            "throughput_change_under_load": (
                round(loaded_rate / statistics.fmean(quiet_rates) - 1, 4)
                if (quiet_rates and loaded_rate)
                else None
            ),
            "cpu_seconds": cpu,
            "load_average_before": load_before,
            "all_step_seconds": [round(d, 3) for _, d, _ in times],
        }
        print(json.dumps(report, indent=2))
        if args.out:
            args.out.write_text(json.dumps(report, indent=2) + "\n")
        client.post(f"/jobs/{job_id}/cancel")
    finally:
        remove_stack(stack)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _gpu_name() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


if __name__ == "__main__":
    main()
