"""``medtune keys create|list|revoke``: API keys, straight in the job store (no HTTP).

``create`` prints the new key once, alone on stdout (``KEY=$(medtune keys create --name ci)``),
and its id and the warning on stderr; only the key's SHA-256 is stored.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlmodel import Session

from cli.output import table
from core import auth
from core.settings import get_settings
from core.store.db import get_engine
from core.store.models import ApiKey


def _stamp(value: datetime | None) -> str | None:
    # SQLite hands back naive datetimes; every stamp we store is UTC.
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def _public(row: ApiKey) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "prefix": row.prefix,
        "admin": row.admin,
        "created_at": _stamp(row.created_at),
        "revoked_at": _stamp(row.revoked_at),
    }


def cmd_create(args: argparse.Namespace, session: Session) -> int:
    row, raw = auth.create_key(session, name=args.name, admin=args.admin)
    if args.json:
        print(json.dumps({**_public(row), "key": raw}, indent=2))
    else:
        print(raw)
    kind = "admin key" if row.admin else "key"
    print(
        f"created {kind} {row.id}" + (f" ({row.name})" if row.name else "") + ": the key above "
        "is shown this once; clients send it as 'Authorization: Bearer <key>'",
        file=sys.stderr,
    )
    return 0


def cmd_list(args: argparse.Namespace, session: Session) -> int:

    rows = auth.list_keys(session)
    if args.json:
        print(json.dumps([_public(r) for r in rows], indent=2))
        return 0
    print(
        table(
            [
                (
                    r.id,
                    r.name,
                    r.prefix + "…",
                    "yes" if r.admin else "no",
                    f"{r.created_at:%Y-%m-%d %H:%M}",
                    f"{r.revoked_at:%Y-%m-%d %H:%M}" if r.revoked_at else None,
                )
                for r in rows
            ],
            ["ID", "NAME", "KEY", "ADMIN", "CREATED", "REVOKED"],
        )
    )
    return 0


def cmd_revoke(args: argparse.Namespace, session: Session) -> int:
    row = auth.revoke_key(session, args.key_id)
    if args.json:
        print(json.dumps(_public(row), indent=2))
    else:
        print(f"revoked {row.id}" + (f" ({row.name})" if row.name else ""))
    return 0


def _run(args: argparse.Namespace) -> int:
    settings = get_settings()
    try:
        with Session(get_engine(settings.db_url), expire_on_commit=False) as session:
            return int(args.keys_func(args, session))
    except auth.KeyNotFound as exc:
        print(f"error {exc.code}: {exc.detail}", file=sys.stderr)
        return 2
    except (OperationalError, ProgrammingError) as exc:
        # Most likely a database that was never migrated (no api_keys table yet).
        print(
            f"error database: {type(exc.orig).__name__}: {str(exc.orig).splitlines()[0]}; "
            "run 'medtune migrate' first",
            file=sys.stderr,
        )
        return 2


def _name(value: str) -> str:
    if not 1 <= len(value) <= 100:
        raise argparse.ArgumentTypeError("a key name has 1 to 100 characters")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="create, list and revoke API keys (in the database)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", type=_name, help="what the key is for (shown by list)")
    create.add_argument("--admin", action="store_true", help="the key sees every job")
    create.set_defaults(keys_func=cmd_create)
    keys_sub.add_parser("list", help="every key, revoked ones too").set_defaults(keys_func=cmd_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key (its jobs stay)")
    revoke.add_argument("key_id", metavar="ID")
    revoke.set_defaults(keys_func=cmd_revoke)
    for parser in (create, keys_sub.choices["list"], revoke):
        parser.add_argument("--json", action="store_true", help="print JSON")
    keys.set_defaults(func=_run)
