"""Client subcommands of ``medtune``: ``jobs create|list|show|watch|cancel|metrics`` and ``infer``
(``files`` is in cli.files, ``export`` and ``artifacts`` in cli.export; cli.main registers them).

They talk to any medtune server over HTTP (``--url``, else ``MEDTUNE_URL``, else
http://127.0.0.1:8000) through :class:`cli.client.MedtuneClient`. ``--json`` prints the API's
own JSON for scripts; otherwise a table or a summary. Exit codes: 0 done, 1 a watched job did not
succeed, 2 an error (the API's ``error <code>: <detail>``, a bad spec file, no server).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cli.client import MedtuneClient
from cli.output import (
    SpecFileError,
    bind,
    duration,
    parse_time,
    print_json,
    table,
    when,
)
from cli.progress import Progress

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


# --- formatting helpers ---------------------------------------------------------------------


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# --- commands -------------------------------------------------------------------------------


def read_spec(path: str) -> dict[str, Any]:
    """A job spec from a JSON file, or from stdin with ``-``."""
    name = "stdin" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SpecFileError("spec_not_found", f"{name}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecFileError("spec_unreadable", f"{name}: {exc}") from exc
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecFileError(
            "invalid_json", f"{name} line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    if not isinstance(spec, dict):
        raise SpecFileError("invalid_spec", f"{name} must hold a JSON object (the job spec)")
    return spec


def cmd_create(args: argparse.Namespace, client: MedtuneClient) -> int:
    job = client.create_job(read_spec(args.file))
    if args.json:
        print_json(job)
    else:
        print(f"job {job['id']} {job['status']}: {job['base_model']} -> {job['finetuned_model']}")
        print(f"follow it with: medtune jobs watch {job['id']}")
    return 0


def cmd_list(args: argparse.Namespace, client: MedtuneClient) -> int:
    if args.all:
        jobs = list(client.iter_jobs(status=args.status, page_size=args.limit))
        page: dict[str, Any] = {
            "object": "list",
            "data": jobs,
            "has_more": False,
            "next_cursor": None,
        }
    else:
        page = client.list_jobs(status=args.status, limit=args.limit, cursor=args.cursor)
    if args.json:
        print_json(page)
        return 0
    rows = [
        (
            j["id"],
            j["status"],
            j.get("stage"),
            f"{j['steps_done']}/{j.get('steps_total') or '?'}",
            when(j["created_at"]),
            j["finetuned_model"],
        )
        for j in page["data"]
    ]
    if rows:
        print(table(rows, ("ID", "STATUS", "STAGE", "STEPS", "CREATED (UTC)", "MODEL")))
    else:
        print("no jobs" + (f" with status {args.status}" if args.status else ""))
    if page.get("has_more"):
        print(f"more: --cursor {page['next_cursor']}, or --all", file=sys.stderr)
    return 0


def _elapsed(job: dict[str, Any]) -> str | None:
    start, end = parse_time(job.get("started_at")), parse_time(job.get("finished_at"))
    return duration((end - start).total_seconds()) if start and end else None


def show_text(job: dict[str, Any]) -> str:
    fields: list[tuple[str, Any]] = [
        ("status", job["status"] + (f" / {job['stage']}" if job.get("stage") else "")),
        ("model", f"{job['base_model']} -> {job['finetuned_model']}"),
        ("engine", job.get("engine")),
        ("steps", f"{job['steps_done']}/{job.get('steps_total') or '?'}"),
        ("created", when(job.get("created_at"))),
        ("started", when(job.get("started_at"))),
        ("finished", when(job.get("finished_at"))),
        ("took", _elapsed(job)),
    ]
    if job.get("cancel_requested") and job["status"] == "running":
        fields.append(("cancel", "requested; stops at the next step"))
    if job.get("error"):
        fields.append(("error", f"{job['error']['code']}: {job['error'].get('message')}"))
    stats = job.get("dataset_stats") or {}
    if stats:
        flat = {k: v for k, v in stats.items() if isinstance(v, int | float | str)}
        fields.append(("dataset", ", ".join(f"{k}={v}" for k, v in flat.items())))
    artifacts = job.get("artifacts") or {}
    fields.append(("adapter", artifacts.get("adapter")))
    fields += [
        (name, tracking_line(name, run)) for name, run in (job.get("tracking") or {}).items()
    ]
    lines = [job["id"]] + [f"  {k:<9} {'-' if v is None else v}" for k, v in fields]
    lines += [f"  note      {note}" for note in job.get("notes") or []]
    return "\n".join(lines)


def tracking_line(name: str, run: dict[str, Any]) -> str:
    """Where a tracker's run is: MLflow's store and run id, or W&B's page (its folder offline)."""
    if name == "mlflow":
        return f"run {run.get('run_id')} at {run.get('tracking_uri')}"
    where = run.get("url") or run.get("dir")
    return f"run {run.get('run_id')} ({run.get('mode')}) at {where}"


def cmd_show(args: argparse.Namespace, client: MedtuneClient) -> int:
    job = client.get_job(args.job_id)
    if args.json:
        print_json(job)
    else:
        print(show_text(job))
    return 0


def final_summary(job: dict[str, Any]) -> str:
    took = _elapsed(job)
    line = (
        f"job {job['id']} {job['status']}: {job['steps_done']}/{job.get('steps_total') or '?'} "
        f"steps" + (f" in {took}" if took else "")
    )
    if job.get("error"):
        line += f"\nerror {job['error']['code']}: {job['error'].get('message')}"
    return line


def cmd_watch(args: argparse.Namespace, client: MedtuneClient) -> int:
    job = client.get_job(args.job_id)  # a wrong id fails here with the API's 404, not mid-stream
    bar = Progress(sys.stdout)
    bar.total = job.get("steps_total")
    try:
        for event in client.events(args.job_id):
            if args.json:
                # One JSON object per event (NDJSON): the stream's own payloads.
                print(json.dumps({"event": event.event, "id": event.id, "data": event.data}))
                sys.stdout.flush()
            elif event.event == "status":
                bar.status(event.data)
            elif event.event == "metric":
                bar.metric(event.data)
    except KeyboardInterrupt:
        bar.close()
        print(f"stopped watching; job {args.job_id} goes on", file=sys.stderr)
        return 130
    bar.close()
    job = client.get_job(args.job_id)  # the row is the truth: status, error, timings
    if not args.json:
        print(final_summary(job))
    return 0 if job["status"] == "succeeded" else 1


def cmd_cancel(args: argparse.Namespace, client: MedtuneClient) -> int:
    job = client.cancel_job(args.job_id)
    if args.json:
        print_json(job)
    elif job["status"] == "cancelled":
        print(f"job {job['id']} cancelled")
    else:
        print(f"job {job['id']} {job['status']}: cancel requested; it stops at its next step")
    return 0


def cmd_metrics(args: argparse.Namespace, client: MedtuneClient) -> int:
    page = client.metrics(args.job_id, after_step=args.after_step, limit=args.limit)
    rows = list(page["data"])
    while args.all and page["has_more"]:
        page = client.metrics(args.job_id, after_step=page["last_step"], limit=args.limit)
        rows += page["data"]
    if args.all:
        page = {**page, "data": rows, "last_step": rows[-1]["step"] if rows else None}
    if args.json:
        print_json(page)
        return 0
    if not rows:
        print(f"no metric rows yet (job {page['status']})")
        return 0
    rewards = any(r.get("rewards_margin") is not None for r in rows)  # dpo / orpo jobs
    print(
        table(
            [
                (
                    r["step"],
                    _num(r.get("loss"), ".4f"),
                    _num(r.get("learning_rate"), ".2e"),
                    _num(r.get("grad_norm"), ".3f"),
                    _num(r.get("tokens_per_second"), ".0f"),
                    _num(r.get("peak_memory_mb"), ".0f"),
                    *(
                        (
                            _num(r.get("rewards_margin"), ".3f"),
                            _num(r.get("rewards_accuracy"), ".2f"),
                        )
                        if rewards
                        else ()
                    ),
                )
                for r in rows
            ],
            ("STEP", "LOSS", "LR", "GRAD_NORM", "TOK/S", "PEAK_MB")
            + (("MARGIN", "ACC") if rewards else ()),
        )
    )
    if page["has_more"]:
        print(f"more: --after-step {page['last_step']}, or --all", file=sys.stderr)
    return 0


def cmd_infer(args: argparse.Namespace, client: MedtuneClient) -> int:
    reply = client.infer(
        args.job_id,
        args.question,
        use_adapter=not args.base,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
    )
    if args.json:
        print_json(reply)
        return 0
    print(reply["answer"])
    # The answer alone on stdout (pipe-friendly); how it was made on stderr.
    tps = reply.get("tokens_per_second")
    print(
        f"-- {reply['model']} ({'adapter' if reply['adapter'] else 'base'}), "
        f"{reply['usage'].get('completion_tokens', '?')} tokens, "
        f"{_num(tps, '.1f')} tok/s, {reply['latency_ms']:.0f} ms, {reply['finish_reason']}",
        file=sys.stderr,
    )
    return 0


def register(sub: Any, common: argparse.ArgumentParser) -> Any:
    """Add ``jobs`` and ``infer`` to ``medtune``; returns the ``jobs`` subparsers."""

    jobs = sub.add_parser("jobs", help="create, list, show, watch, cancel training jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)

    create = jobs_sub.add_parser("create", parents=[common], help="submit a job spec")
    create.add_argument("-f", "--file", required=True, help="JSON job spec, or - for stdin")
    create.set_defaults(func=bind(cmd_create))

    listing = jobs_sub.add_parser("list", parents=[common], help="jobs, newest first")
    listing.add_argument("--status", choices=STATUSES)
    listing.add_argument("--limit", type=int, default=20, help="jobs per page (1-100)")
    listing.add_argument("--cursor", help="next_cursor of the previous page")
    listing.add_argument("--all", action="store_true", help="follow the cursor to the last page")
    listing.set_defaults(func=bind(cmd_list))

    show = jobs_sub.add_parser("show", parents=[common], help="one job in full")
    show.add_argument("job_id")
    show.set_defaults(func=bind(cmd_show))

    watch = jobs_sub.add_parser(
        "watch", parents=[common], help="live progress until the job ends (exit 0 if succeeded)"
    )
    watch.add_argument("job_id")
    watch.set_defaults(func=bind(cmd_watch))

    cancel = jobs_sub.add_parser("cancel", parents=[common], help="cancel a job")
    cancel.add_argument("job_id")
    cancel.set_defaults(func=bind(cmd_cancel))

    metrics = jobs_sub.add_parser("metrics", parents=[common], help="per-step training metrics")
    metrics.add_argument("job_id")
    metrics.add_argument("--after-step", type=int, default=-1)
    metrics.add_argument("--limit", type=int, default=100, help="rows per page (1-1000)")
    metrics.add_argument("--all", action="store_true", help="every page")
    metrics.set_defaults(func=bind(cmd_metrics))

    infer = sub.add_parser("infer", parents=[common], help="ask a finished job's tuned model")
    infer.add_argument("job_id")
    infer.add_argument("question")
    infer.add_argument("--base", action="store_true", help="ask the base model (no adapter)")
    infer.add_argument("--max-new-tokens", type=int)
    infer.add_argument("--temperature", type=float)
    infer.set_defaults(func=bind(cmd_infer))

    return jobs_sub
