"""``medtune export``, ``medtune jobs artifacts`` and ``medtune artifacts download``.

``export JOB_ID --format gguf --quantization q8_0 --wait`` queues POST /jobs/{id}/exports and,
with ``--wait``, polls GET /jobs/{id}/artifacts until every requested entry has settled (ok or
failed). Errors and exit codes are those of the other client commands (cli.jobs): the
API's ``error <code>: <detail>`` on stderr and exit 2; a waited export with a failed entry
exits 1.

The HTTP calls go through MedtuneClient's own request plumbing (same errors, same auth header);
they live here rather than on the client class, which another module owns.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from cli.client import ApiError, ClientError, MedtuneClient
from cli.output import bind, print_json, table

FORMATS = ("lora", "merged_16bit", "merged_4bit", "gguf")
QUANTIZATIONS = ("f16", "q8_0", "q4_k_m")
POLL_SECONDS = 2.0


class ExportWaitError(ClientError):
    """A local failure of --wait or download (timeout, bad path, checksum), exit code 2."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


# --- API calls ------------------------------------------------------------------------------


def request_export(
    client: MedtuneClient,
    job_id: str,
    *,
    formats: list[str],
    gguf_quantizations: list[str] | None,
    push_to_hub: bool,
) -> dict[str, Any]:
    return client.create_export(
        job_id, formats=formats, gguf_quantizations=gguf_quantizations, push_to_hub=push_to_hub
    )


def list_artifacts(client: MedtuneClient, job_id: str) -> dict[str, Any]:
    return client.list_artifacts(job_id)


def _manifest_or_empty(client: MedtuneClient, job_id: str) -> dict[str, Any]:
    # Before a job's first export there is no manifest yet: the API says artifacts_not_ready.
    try:
        formats: dict[str, Any] = list_artifacts(client, job_id)["formats"]
    except ApiError as exc:
        if exc.code != "artifacts_not_ready":
            raise
        return {}
    return formats


def wait_for_entries(
    client: MedtuneClient,
    job_id: str,
    keys: list[str],
    *,
    before: dict[str, Any],
    notes_before: int,
    timeout_s: float,
    poll_s: float = POLL_SECONDS,
) -> dict[str, Any]:
    """Poll until each of ``keys`` has settled; the manifest's entries for ``keys``.

    Entries must be present and not ``running``, and must come from this export, not the
    previous one: each was seen ``running`` or differs from ``before`` (the manifest ahead of
    the request), or the job gained notes (the worker adds them last, after the manifest and
    the push), which also covers an entry that came out identical to the old one.
    """
    deadline = time.monotonic() + timeout_s
    seen_running: set[str] = set()
    while True:
        formats = _manifest_or_empty(client, job_id)
        seen_running |= {k for k in keys if formats.get(k, {}).get("status") == "running"}
        present = [k for k in keys if k in formats and formats[k].get("status") != "running"]
        fresh = all(k in seen_running or formats[k] != before.get(k) for k in present)
        if len(present) == len(keys) and (
            fresh or len(client.get_job(job_id)["notes"]) > notes_before
        ):
            return {k: formats[k] for k in keys}
        if time.monotonic() >= deadline:
            pending = ", ".join(k for k in keys if k not in present) or ", ".join(keys)
            raise ExportWaitError(
                "export_wait_timeout",
                f"{pending} of job {job_id} not finished after {timeout_s:.0f} s; the export "
                f"goes on: check with `medtune jobs artifacts {job_id}`, or raise --timeout",
            )
        time.sleep(poll_s)


def download_artifact(
    client: MedtuneClient, job_id: str, fmt: str, file_name: str, target: Path
) -> dict[str, Any]:
    """Stream one listed file to ``target`` (via a temporary file); checks its sha256."""
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    size = 0
    try:
        with client.stream_artifact(job_id, fmt, file_name) as resp:
            expected = resp.headers.get("x-checksum-sha256")
            with partial.open("wb") as out:
                for block in resp.iter_bytes(1 << 20):
                    out.write(block)
                    digest.update(block)
                    size += len(block)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if expected and digest.hexdigest() != expected:
        partial.unlink(missing_ok=True)
        raise ExportWaitError(
            "checksum_mismatch",
            f"{fmt}/{file_name}: got sha256 {digest.hexdigest()}, the server lists {expected}; "
            "download it again",
        )
    os.replace(partial, target)
    return {"path": str(target), "bytes": size, "sha256": digest.hexdigest()}


# --- formatting -----------------------------------------------------------------------------


def _size(num: int | None) -> str:
    if num is None:
        return "-"
    value = float(num)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{num} B"  # not reached


def artifact_rows(formats: dict[str, Any]) -> list[tuple[Any, ...]]:
    """One row per file of an ok entry, one per failed or running entry."""
    rows: list[tuple[Any, ...]] = []
    for key, entry in formats.items():
        status = entry.get("status")
        if key == "hub":
            rows.append((key, entry.get("repo_id"), None, None, status, _error_code(entry)))
            continue
        files = entry.get("files") or []
        if status != "ok" or not files:
            rows.append((key, None, None, None, status, _error_code(entry)))
            continue
        for f in files:
            rows.append((key, f"{key}/{f['file']}", _size(f["bytes"]), f["sha256"], status, None))
    return rows


def _error_code(entry: dict[str, Any]) -> str | None:
    error = entry.get("error")
    return str(error.get("code")) if isinstance(error, dict) else None


def artifacts_table(formats: dict[str, Any]) -> str:
    headers = ("ENTRY", "NAME", "SIZE", "SHA256", "STATUS", "ERROR")
    return table(artifact_rows(formats), headers)


# --- commands -------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace, client: MedtuneClient) -> int:
    formats = list(dict.fromkeys(args.format))
    quantizations = list(dict.fromkeys(args.quantization or []))
    if quantizations and "gguf" not in formats:
        print(
            "error invalid_argument: --quantization applies to GGUF files; add --format gguf",
            file=sys.stderr,
        )
        return 2
    # What the job looked like ahead of the request, so --wait knows this export's results.
    before = _manifest_or_empty(client, args.job_id) if args.wait else {}
    notes_before = len(client.get_job(args.job_id)["notes"]) if args.wait else 0
    queued = request_export(
        client,
        args.job_id,
        formats=formats,
        gguf_quantizations=quantizations or None,
        push_to_hub=args.push_to_hub,
    )
    keys: list[str] = list(queued["artifacts"])
    if args.push_to_hub:
        keys.append("hub")
    if not args.wait:
        if args.json:
            print_json(queued)
        else:
            print(f"export of job {args.job_id} queued: {', '.join(queued['artifacts'])}")
            print(f"follow it with: medtune jobs artifacts {args.job_id}", file=sys.stderr)
        return 0
    if not args.json:
        print(
            f"export of job {args.job_id} queued: {', '.join(queued['artifacts'])}; waiting",
            file=sys.stderr,
        )
    settled = wait_for_entries(
        client,
        args.job_id,
        keys,
        before=before,
        notes_before=notes_before,
        timeout_s=args.timeout,
        poll_s=args.poll,
    )
    failed = [k for k, entry in settled.items() if entry.get("status") != "ok"]
    if args.json:
        print_json({**queued, "status": "failed" if failed else "done", "results": settled})
    else:
        print(artifacts_table(settled))
        for key in failed:
            error = settled[key].get("error") or {}
            print(f"{key} failed ({error.get('code')}): {error.get('message')}", file=sys.stderr)
    return 1 if failed else 0


def cmd_artifacts(args: argparse.Namespace, client: MedtuneClient) -> int:
    listed = list_artifacts(client, args.job_id)
    if args.json:
        print_json(listed)
        return 0
    formats = listed["formats"]
    print(artifacts_table(formats) if formats else f"job {args.job_id} has no artifacts")
    return 0


def _split_path(path: str) -> tuple[str, str]:
    fmt, sep, file_name = path.strip("/").partition("/")
    if not sep or not fmt or not file_name or "/" in file_name:
        raise ExportWaitError(
            "invalid_artifact_path",
            f"{path!r}: give ENTRY/FILE as `medtune jobs artifacts JOB_ID` lists it "
            "(e.g. gguf_q4_k_m/model-q4_k_m.gguf)",
        )
    return fmt, file_name


def cmd_download(args: argparse.Namespace, client: MedtuneClient) -> int:
    try:
        fmt, file_name = _split_path(args.path)
        target = Path(args.output or file_name)
        if target.is_dir():
            target = target / file_name
        got = download_artifact(client, args.job_id, fmt, file_name, target)
    except ExportWaitError as exc:
        print(f"error {exc.code}: {exc.detail}", file=sys.stderr)
        return 2
    if args.json:
        print_json(got)
    else:
        print(got["path"])
        print(f"{_size(got['bytes'])}, sha256 {got['sha256']} (checked)", file=sys.stderr)
    return 0


def _run_export(args: argparse.Namespace, client: MedtuneClient) -> int:
    try:
        return cmd_export(args, client)
    except ExportWaitError as exc:
        print(f"error {exc.code}: {exc.detail}", file=sys.stderr)
        return 2


# --- wiring ---------------------------------------------------------------------------------


def register(sub: Any, common: argparse.ArgumentParser, jobs_sub: Any) -> None:
    """Add ``export``, ``jobs artifacts`` and ``artifacts download`` to ``medtune``."""
    export = sub.add_parser(
        "export",
        parents=[common],
        help="export a succeeded job's model (again, or in more formats)",
    )
    export.add_argument("job_id")
    export.add_argument(
        "--format",
        action="extend",
        nargs="+",
        choices=FORMATS,
        required=True,
        help="one or more of: " + ", ".join(FORMATS),
    )
    export.add_argument(
        "--quantization",
        action="extend",
        nargs="+",
        choices=QUANTIZATIONS,
        help="GGUF files to write with --format gguf (default on the server: q4_k_m)",
    )
    export.add_argument(
        "--push-to-hub", action="store_true", help="push the new artifacts with the worker's token"
    )
    export.add_argument(
        "--wait", action="store_true", help="wait for the artifacts; exit 1 if one failed"
    )
    export.add_argument(
        "--timeout", type=float, default=3600, help="seconds --wait waits (default 3600)"
    )
    export.add_argument(
        "--poll", type=float, default=POLL_SECONDS, help="seconds between --wait's polls"
    )
    export.set_defaults(func=bind(_run_export))

    artifacts = jobs_sub.add_parser(
        "artifacts", parents=[common], help="a job's exported files (size, sha256, status)"
    )
    artifacts.add_argument("job_id")
    artifacts.set_defaults(func=bind(cmd_artifacts))

    group = sub.add_parser("artifacts", help="download a job's exported files")
    group_sub = group.add_subparsers(dest="artifacts_command", required=True)
    download = group_sub.add_parser(
        "download", parents=[common], help="download one file; its sha256 is checked"
    )
    download.add_argument("job_id")
    download.add_argument("path", help="ENTRY/FILE as `medtune jobs artifacts` lists it")
    download.add_argument("-o", "--output", help="file or folder (default: FILE, here)")
    download.set_defaults(func=bind(cmd_download))
