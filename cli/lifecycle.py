"""A job's life after it ends: ``medtune jobs continue``, ``jobs delete`` and ``retention``.

``jobs continue JOB [-f changes.json]`` submits a job that starts from JOB's adapter
(``model_config.init_adapter``). ``jobs delete JOB`` is a client of the API
(``DELETE /jobs/{id}``); ``retention`` runs where the
service's stores are (like ``migrate``), with the service's settings: ``--dry-run`` lists what
a sweep under ``MEDTUNE_RETENTION_DAYS`` (or ``--days``) would remove, and without it removes them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cli.client import MedtuneClient
from cli.output import bind, print_json, table, when


def cmd_delete(args: argparse.Namespace, client: MedtuneClient) -> int:
    deleted = client.delete_job(args.job_id)
    if args.json:
        print_json(deleted)
    else:
        print(f"job {deleted['id']} deleted (rows, metrics, artifacts, checkpoints, logs)")
    return 0


def continue_spec(source: dict[str, Any], changes: dict[str, Any] | None) -> dict[str, Any]:
    """The source job's spec, starting from its adapter, with ``changes``' sections merged in
    (a section's keys replace the source's). Its webhook is not carried over: the server shows
    the secret masked, so a webhook must come with ``changes``."""
    spec = {k: v for k, v in source["spec"].items() if k != "webhook"}
    for key, value in (changes or {}).items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    spec["model_config"] = {**spec.get("model_config", {}), "init_adapter": source["id"]}
    return spec


def cmd_continue(args: argparse.Namespace, client: MedtuneClient) -> int:
    from cli.jobs import read_spec

    changes = read_spec(args.file) if args.file else None
    created = client.create_job(continue_spec(client.get_job(args.job_id), changes))
    if args.json:
        print_json(created)
    else:
        print(created["id"])
        print(
            f"continues job {args.job_id}; follow it with: medtune jobs watch {created['id']}",
            file=sys.stderr,
        )
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    from core import retention
    from core.settings import get_settings
    from core.store.db import session_scope

    settings = get_settings()
    days = settings.retention_days if args.days is None else args.days
    if not days:
        print(
            "error retention_off: MEDTUNE_RETENTION_DAYS is 0 (keep everything); set it, or "
            "pass --days N",
            file=sys.stderr,
        )
        return 2
    with session_scope(settings.db_url) as s:
        result = retention.sweep(s, settings, days=days, dry_run=args.dry_run)
    if args.json:
        print_json({"dry_run": args.dry_run, "days": days, **result.as_dict()})
        return 0
    print(_retention_text(result, days=days, dry_run=args.dry_run))
    return 0


def _retention_text(result: Any, *, days: float, dry_run: bool) -> str:
    verb = "would remove" if dry_run else "removed"
    parts = [f"older than {days:g} days (before {when(result.cutoff.isoformat())} UTC): {verb}"]
    job_rows = [(j["id"], j["status"], when(j["ended_at"])) for j in result.jobs]
    file_rows = [(f["id"], f["bytes"], when(f["created_at"]), f["filename"]) for f in result.files]
    parts.append(table(job_rows, ("JOB", "STATUS", "ENDED (UTC)")) if job_rows else "no jobs")
    parts.append(
        table(file_rows, ("FILE", "BYTES", "CREATED (UTC)", "NAME")) if file_rows else "no files"
    )
    return "\n\n".join(parts)


def register(sub: Any, common: argparse.ArgumentParser, jobs_sub: Any) -> None:
    """Add ``jobs delete`` and ``retention`` to the ``medtune`` subcommands."""
    delete = jobs_sub.add_parser(
        "delete",
        parents=[common],
        help="delete a finished job and everything it wrote (cancel a running one first)",
    )
    delete.add_argument("job_id")
    delete.set_defaults(func=bind(cmd_delete))

    cont = jobs_sub.add_parser(
        "continue",
        parents=[common],
        help="a new job starting from a succeeded job's adapter (its spec, with -f's changes)",
    )
    cont.add_argument("job_id")
    cont.add_argument("-f", "--file", help="spec sections to change (JSON; '-' reads stdin)")
    cont.set_defaults(func=bind(cmd_continue))

    keep = sub.add_parser(
        "retention",
        help="remove finished jobs and unused uploads older than MEDTUNE_RETENTION_DAYS",
    )
    keep.add_argument("--dry-run", action="store_true", help="list what would go; remove nothing")
    keep.add_argument("--days", type=float, help="instead of MEDTUNE_RETENTION_DAYS")
    keep.add_argument("--json", action="store_true", help="print the list as JSON")
    keep.set_defaults(func=cmd_retention)
