"""The ``medtune`` command: run the service's parts, or all of them on the embedded defaults.

The parts run as child processes by module name, so this module imports neither ``api`` nor
``worker``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from cli import evaluation, export, files, jobs, keys, lifecycle, plots, services
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


def migrate(settings: Settings) -> None:
    from core.store.migrate import upgrade

    settings.ensure_dirs()
    upgrade(settings.db_url)


def cmd_migrate(_: argparse.Namespace) -> int:
    settings = get_settings()
    migrate(settings)
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


def services_log(settings: Settings) -> Path:
    return settings.home / "services.log"


def cmd_up(args: argparse.Namespace) -> int:
    """Migrate, then run the API, a training worker and an inference worker until Ctrl-C.

    Their logs (Alembic's, Celery's banners, model loading) go to $MEDTUNE_HOME/services.log,
    and to the terminal too with --verbose; "medtune is up" is printed once all three answer.
    """
    from core.queue import INFER_QUEUE, TRAIN_QUEUE

    settings = get_settings()
    settings.ensure_dirs()
    log_path = services_log(settings)
    host, port = args.host or settings.api_host, args.port or settings.api_port
    print(f"starting medtune (service logs: {log_path})", flush=True)
    with log_path.open("ab") as log_file:
        with logs_to(log_file):
            migrate(settings)
        _bind(host)
        auth_line = describe_auth(get_settings())
        lock = threading.Lock()
        start = functools.partial(services.start, log=log_file, lock=lock, verbose=args.verbose)
        children = [
            start(
                "train",
                worker_command(TRAIN_QUEUE, "train"),
                ready_pattern=services.worker_ready_pattern("train"),
            ),
            start(
                "infer",
                worker_command(INFER_QUEUE, "infer"),
                env=shared_infer_env(settings),
                ready_pattern=services.worker_ready_pattern("infer"),
            ),
            start("api", api_command(host, port)),
        ]
        return _serve(children, args, f"http://{_local(host)}:{port}", log_path, auth_line)


def _serve(
    children: list[services.Child], args: argparse.Namespace, url: str, log: Path, auth: str
) -> int:
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    settings = get_settings()
    try:
        missing = services.wait_until_ready(children, url, timeout_s=args.ready_timeout)
        if missing:
            print(f"medtune did not come up: {', '.join(missing)} not ready; the log ends:")
            print(services.tail(log), flush=True)
            return 1
        print(
            f"medtune is up: {url}/  (API docs {url}/docs; db {_redact(settings.db_url)}, "
            f"broker {_redact(settings.celery_broker_url)}; auth {auth})",
            flush=True,
        )
        while not stopping and all(c.process.poll() is None for c in children):
            time.sleep(0.5)
    finally:
        for child in children:
            if child.process.poll() is None:
                child.process.terminate()
        for child in children:
            try:
                child.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.process.kill()
    return 0 if stopping else 1


def _local(host: str) -> str:
    # An API bound to every interface is still reached over loopback from here.
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


@contextlib.contextmanager
def logs_to(stream: IO[bytes]) -> Iterator[None]:
    """Route this process's log records (Alembic's INFO lines) into ``stream``; the terminal
    still gets what main() lets through (warnings, or everything with --verbose)."""
    handler = logging.StreamHandler(io.TextIOWrapper(stream, write_through=True))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    saved = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.stream.detach()
        root.setLevel(saved)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo against --url; with no server there, start one for the demo's length."""
    import httpx

    from cli.demo import run_demo

    if services.api_answers(args.url):
        return run_demo(url=args.url, max_steps=args.max_steps)
    port = httpx.URL(args.url).port or 8000
    argv = [sys.executable, "-m", "cli.main", "up", "--port", str(port)]
    # `up` prints its own few lines (where the logs go, then "up" or why not); with --verbose
    # the service logs come through on stderr as well.
    up = subprocess.Popen(
        argv + (["--verbose"] if args.verbose else []), stdout=subprocess.PIPE, text=True
    )
    try:
        assert up.stdout is not None
        for line in up.stdout:
            print(line, end="", flush=True)
            if line.startswith("medtune is up"):
                break
        else:
            return 1  # `up` exited; it said why
        threading.Thread(target=up.stdout.read, daemon=True).start()  # keep its pipe drained
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
    up.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show the services' logs here (they always go to $MEDTUNE_HOME/services.log)",
    )
    up.add_argument(
        "--ready-timeout", type=float, default=600, help="seconds to wait for the services"
    )
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
    demo.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show the services' logs here (they always go to $MEDTUNE_HOME/services.log)",
    )
    demo.set_defaults(func=cmd_demo)
    # Every command group registers itself here, as torchtune's `tune` and TRL's CLI do.
    common = common_parser()
    jobs_sub = jobs.register(sub, common)
    files.register(sub, common)
    export.register(sub, common, jobs_sub)
    evaluation.register(jobs_sub, common)
    plots.register(jobs_sub, common)
    keys.register(sub)
    lifecycle.register(sub, common, jobs_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Quiet by default: a user reads the command's own lines; libraries' INFO records (httpx's
    # request lines, Alembic's steps) show with --verbose, or in the services' log file.
    level = logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
