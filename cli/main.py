"""The ``medtune`` command: run the service's parts, or all of them on the embedded defaults.

The parts run as child processes by module name, so this module imports neither ``api`` nor
``worker``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from cli import evaluation, export, files, jobs, keys
from cli.output import common_parser
from core.auth import describe as describe_auth
from core.settings import Settings, get_settings

log = logging.getLogger("medtune")


def api_command(host: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "api.main:app",
        "--host",
        host,
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]


def worker_command(queues: str, name: str) -> list[str]:
    # solo pool: one job per process, the model stays in this process (one process per GPU).
    # An inference-only worker takes several requests at once on threads, so the engine's one
    # model thread can batch them (core/inference/batching.py); the model is still loaded once.
    from core.queue import INFER_QUEUE

    pool, concurrency = "solo", 1
    if queues.split(",") == [INFER_QUEUE]:
        pool, concurrency = "threads", get_settings().infer_concurrency
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "-Q",
        queues,
        "-n",
        f"{name}@%h",
        "--loglevel",
        "INFO",
    ]


def cmd_migrate(_: argparse.Namespace) -> int:
    from core.store.migrate import upgrade

    settings = get_settings()
    settings.ensure_dirs()
    upgrade(settings.db_url)
    print(f"database at head: {_redact(settings.db_url)}")
    return 0


def _exec(argv: list[str]) -> int:
    # Replace this process, so signals (a container's SIGTERM) reach uvicorn or celery directly.
    os.execv(argv[0], argv)
    return 1  # not reached


def _bind(host: str) -> None:
    # The API reads its bind host from the settings to decide whether keys are needed (auto).
    os.environ["MEDTUNE_API_HOST"] = host
    get_settings.cache_clear()


def cmd_api(args: argparse.Namespace) -> int:
    settings = get_settings()
    host = args.host or settings.api_host
    _bind(host)
    return _exec(api_command(host, args.port or settings.api_port))


def cmd_worker(args: argparse.Namespace) -> int:
    return _exec(worker_command(args.queues, args.name))


def cmd_prepare_model(_: argparse.Namespace) -> int:
    from core.embedded_model import prepare_embedded_model

    settings = get_settings()
    settings.ensure_dirs()
    print(prepare_embedded_model(settings.models_dir))
    return 0


def shared_infer_env(settings: Settings) -> dict[str, str] | None:
    """The inference worker's environment when a training worker runs on the same machine.

    Alone, an inference-only worker gives llama.cpp every CPU; beside training that would
    oversubscribe the cores and collapse both, so it gets what a worker that also trains gets.
    None (inherit) when the operator chose a thread count.
    """
    if settings.infer_threads:
        return None
    threads = settings.llama_threads(inference_only=False)
    return {**os.environ, "MEDTUNE_INFER_THREADS": str(threads)}


def cmd_up(args: argparse.Namespace) -> int:
    """Migrate, then run the API, a training worker and an inference worker until Ctrl-C."""
    from core.queue import INFER_QUEUE, TRAIN_QUEUE

    settings = get_settings()
    cmd_migrate(args)
    host, port = args.host or settings.api_host, args.port or settings.api_port
    _bind(host)
    auth_line = describe_auth(get_settings())
    children = [
        subprocess.Popen(worker_command(TRAIN_QUEUE, "train")),
        subprocess.Popen(worker_command(INFER_QUEUE, "infer"), env=shared_infer_env(settings)),
        subprocess.Popen(api_command(host, port)),
    ]
    print(
        f"medtune is up: http://{host}:{port}/docs  (db {_redact(settings.db_url)}, "
        f"broker {_redact(settings.celery_broker_url)}; auth {auth_line})",
        flush=True,
    )
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping and all(c.poll() is None for c in children):
            time.sleep(0.5)
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
    return 0 if stopping else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo against --url; with no server there, start one for the demo's length."""
    import httpx

    from cli.demo import run_demo

    try:
        running = httpx.get(f"{args.url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        running = False
    if running:
        return run_demo(url=args.url, max_steps=args.max_steps)
    port = httpx.URL(args.url).port or 8000
    settings = get_settings()
    settings.ensure_dirs()
    log_path = settings.home / "demo-services.log"
    print(f"starting medtune on port {port} (service logs: {log_path})", flush=True)
    with log_path.open("ab") as log_file:
        up = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "up", "--port", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        return run_demo(url=args.url, max_steps=args.max_steps)
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtune",
        description=__doc__,
        epilog="Client commands talk to --url (else $MEDTUNE_URL, else http://127.0.0.1:8000) "
        "and send the key in $MEDTUNE_API_KEY, if set, as 'Authorization: Bearer <key>'.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run API and workers together on the configured stores")
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.set_defaults(func=cmd_up)
    api = sub.add_parser("api", help="run the HTTP API")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    api.set_defaults(func=cmd_api)
    worker = sub.add_parser("worker", help="run one worker process")
    worker.add_argument("--queues", default="medtune.train,medtune.infer")
    worker.add_argument("--name", default="worker")
    worker.set_defaults(func=cmd_worker)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)
    sub.add_parser("prepare-model", help="convert the embedded model once").set_defaults(
        func=cmd_prepare_model
    )
    demo = sub.add_parser(
        "demo", help="fine-tune on the shipped sample, follow it, ask base and tuned models"
    )
    demo.add_argument("--url", default=os.environ.get("MEDTUNE_URL", "http://127.0.0.1:8000"))
    demo.add_argument("--max-steps", type=int, default=60)
    demo.set_defaults(func=cmd_demo)
    # Every command group registers itself here, as torchtune's `tune` and TRL's CLI do.
    common = common_parser()
    jobs_sub = jobs.register(sub, common)
    files.register(sub, common)
    export.register(sub, common, jobs_sub)
    evaluation.register(jobs_sub, common)
    keys.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
