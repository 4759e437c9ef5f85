"""What every client command shares: printing, time formatting, and running a command against
the API with its errors turned into one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TextIO

from cli.client import (
    DEFAULT_URL,
    ApiError,
    ClientError,
    MedtuneClient,
    ServerUnreachable,
    default_url,
)


class SpecFileError(ClientError):
    """The spec file could not be read as a JSON object (checked before any request)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def print_json(data: Any, out: TextIO | None = None) -> None:
    print(json.dumps(data, indent=2), file=out or sys.stdout)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Left-aligned columns, two spaces apart; None shows as '-'."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def when(stamp: str | None) -> str | None:
    # The API's stamps are ISO 8601 UTC; a table wants them short.
    return stamp[:19].replace("T", " ") if stamp else None


def parse_time(stamp: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(stamp) if stamp else None
    except ValueError:
        return None


def run_client_command(
    args: argparse.Namespace, command: Callable[[argparse.Namespace, MedtuneClient], int]
) -> int:
    """Run one command; API and connection errors become a line on stderr and exit code 2."""
    # `medtune` logs at INFO for the service commands; a client's output is its own lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        with MedtuneClient(args.url) as client:
            return command(args, client)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as Python's docs advise for EPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except ApiError as exc:
        print(f"error {exc.code}: {exc.detail}", file=sys.stderr)
        return 2
    except SpecFileError as exc:
        print(f"error {exc.code}: {exc.detail}", file=sys.stderr)
        return 2
    except ServerUnreachable as exc:
        print(
            f"error: {exc}\n"
            "hint: start a server with `medtune up`, or point at one with --url or MEDTUNE_URL",
            file=sys.stderr,
        )
        return 2


def bind(command: Callable[[argparse.Namespace, MedtuneClient], int]) -> Any:
    return lambda args: run_client_command(args, command)


def common_parser() -> argparse.ArgumentParser:
    """--url and --json, shared by every client command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=default_url(),
        help=f"the API (default: $MEDTUNE_URL, else {DEFAULT_URL}); where it requires keys, "
        "the key in $MEDTUNE_API_KEY is sent as 'Authorization: Bearer <key>'",
    )
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    return common
