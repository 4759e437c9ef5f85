"""``medtune files upload|list|delete``: dataset files on a medtune server.

``files upload data.jsonl`` prints the new file's id, which a job spec names in
``training_dataset.name``. Errors and exit codes are those of the other client commands
(cli.jobs): the API's ``error <code>: <detail>`` on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cli.client import ClientError, MedtuneClient
from cli.output import bind, print_json, table, when


class UploadFileError(ClientError):
    """The local file to upload cannot be read (checked before any request)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def _readable(path: str) -> Path:
    source = Path(path)
    if not source.is_file():
        raise UploadFileError("file_not_found", f"{path}: no such file")
    return source


def cmd_upload(args: argparse.Namespace, client: MedtuneClient) -> int:
    try:
        source = _readable(args.path)
    except UploadFileError as exc:
        print(f"error {exc.code}: {exc.detail}", file=sys.stderr)
        return 2
    uploaded = client.upload_file(
        source, purpose=args.purpose, idempotency_key=args.idempotency_key
    )
    if args.json:
        print_json(uploaded)
    else:
        print(uploaded["id"])
        print(
            f"{uploaded['filename']}: {uploaded['bytes']} bytes, sha256 {uploaded['sha256']}; "
            f'use it with "training_dataset": {{"name": "{uploaded["id"]}"}}',
            file=sys.stderr,
        )
    return 0


def cmd_list(args: argparse.Namespace, client: MedtuneClient) -> int:
    if args.all:
        page: dict[str, Any] = {
            "object": "list",
            "data": list(client.iter_files(page_size=args.limit)),
            "has_more": False,
            "last_id": None,
        }
    else:
        page = client.list_files(limit=args.limit, after=args.after)
    if args.json:
        print_json(page)
        return 0
    rows = [
        (f["id"], f["bytes"], f["purpose"], when(f["created_at"]), f["filename"])
        for f in page["data"]
    ]
    print(table(rows, ("ID", "BYTES", "PURPOSE", "CREATED (UTC)", "NAME")) if rows else "no files")
    if page.get("has_more"):
        print(f"more: --after {page['last_id']}, or --all", file=sys.stderr)
    return 0


def cmd_delete(args: argparse.Namespace, client: MedtuneClient) -> int:
    deleted = client.delete_file(args.file_id)
    if args.json:
        print_json(deleted)
    else:
        print(f"file {deleted['id']} deleted")
    return 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``files`` to the ``medtune`` subcommands, with the client commands' --url/--json."""
    files = sub.add_parser("files", help="upload, list and delete dataset files")
    files_sub = files.add_subparsers(dest="files_command", required=True)

    upload = files_sub.add_parser(
        "upload", parents=[common], help="upload a dataset file; prints its id"
    )
    upload.add_argument("path", help=".jsonl, .json, .csv, .parquet, or MedQuAD .zip/.xml")
    upload.add_argument("--purpose", default="fine-tune", help="default: fine-tune")
    upload.add_argument(
        "--idempotency-key", help="a retry with the same key returns the first upload"
    )
    upload.set_defaults(func=bind(cmd_upload))

    listing = files_sub.add_parser("list", parents=[common], help="your files, newest first")
    listing.add_argument("--limit", type=int, default=20, help="files per page (1-100)")
    listing.add_argument("--after", help="last id of the previous page")
    listing.add_argument("--all", action="store_true", help="every page")
    listing.set_defaults(func=bind(cmd_list))

    delete = files_sub.add_parser(
        "delete", parents=[common], help="delete a file (refused while a job uses it)"
    )
    delete.add_argument("file_id")
    delete.set_defaults(func=bind(cmd_delete))
