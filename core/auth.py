"""API keys and who a request is.

A key is ``mt_`` plus 32 random bytes (URL-safe base64); only its SHA-256 is stored, so a
database dump yields no usable key. A fast hash is enough here: the input has 256 bits of
entropy, so there is nothing to brute-force (passwords need a slow hash; random tokens do not).

Auth modes (``MEDTUNE_AUTH``): ``required``, ``disabled``, or ``auto``: required unless the API
is bound to loopback (``MEDTUNE_API_HOST``). In ``auto`` a request that arrived on, or came
from, a non-loopback address also needs a key whatever the setting says, so an API started with
``uvicorn --host 0.0.0.0`` but left on the default setting is not open to the network.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from core.errors import MedtuneError, NotFoundError
from core.settings import Settings
from core.store.models import ApiKey, utcnow

KEY_PREFIX = "mt_"
ANONYMOUS_SCOPE = "anonymous"
ENV_ADMIN_SCOPE = "admin"
_REALM = 'Bearer realm="medtune"'


class Unauthorized(MedtuneError):
    """No API key, or one that is not (or no longer) valid: 401 with WWW-Authenticate."""

    code = "unauthorized"
    status = 401

    def __init__(self, detail: str, *, invalid_token: bool = False) -> None:
        super().__init__(detail, field="Authorization")
        # RFC 6750: say "invalid_token" only when a token was sent.
        self.headers = {
            "WWW-Authenticate": _REALM + (', error="invalid_token"' if invalid_token else "")
        }


class Forbidden(MedtuneError):
    code = "forbidden"
    status = 403


class KeyNotFound(NotFoundError):
    code = "key_not_found"


@dataclass(frozen=True)
class Principal:
    """Who sent a request.

    ``key_id`` is stamped on the jobs it creates (None: the env admin key, or auth disabled);
    ``scope`` keys its rate limits and idempotency keys.
    """

    key_id: str | None
    admin: bool
    scope: str

    @property
    def job_owner(self) -> str | None:
        """The owner a job must have for this principal to see it; None sees every job."""
        return None if self.admin else self.key_id


ANONYMOUS = Principal(key_id=None, admin=True, scope=ANONYMOUS_SCOPE)
ENV_ADMIN = Principal(key_id=None, admin=True, scope=ENV_ADMIN_SCOPE)


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def create_key(
    session: Session, *, name: str | None = None, admin: bool = False
) -> tuple[ApiKey, str]:
    """Store a new key's hash; returns the row and the key itself (never stored, shown once)."""
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name, key_hash=hash_key(raw), prefix=raw[:11], admin=admin)
    session.add(row)
    session.commit()
    session.refresh(row)
    return row, raw


def list_keys(session: Session) -> Sequence[ApiKey]:
    return session.exec(select(ApiKey).order_by(col(ApiKey.created_at), col(ApiKey.id))).all()


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """Revoke a key (idempotent); its jobs stay, visible to admins."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise KeyNotFound(f"no API key with id {key_id!r}", field="key_id")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.add(row)
        session.commit()
        session.refresh(row)
    return row


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(session: Session, settings: Settings, authorization: str | None) -> Principal:
    """The principal an ``Authorization: Bearer`` header names, or Unauthorized."""
    if not authorization:
        raise Unauthorized(
            "this API needs a key: send 'Authorization: Bearer <key>'; an operator creates one "
            "with 'medtune keys create'"
        )
    token = _bearer(authorization)
    if token is None:
        raise Unauthorized("the Authorization header must be 'Bearer <key>'", invalid_token=True)
    digest = hash_key(token)
    if settings.admin_key is not None:
        # Digests compared, so the comparison takes the same time whatever the lengths.
        expected = hash_key(settings.admin_key.get_secret_value())
        if hmac.compare_digest(digest, expected):
            return ENV_ADMIN
    # Looking up by the digest of a 256-bit random key leaks nothing a timing attack could use.
    row = session.exec(select(ApiKey).where(ApiKey.key_hash == digest)).first()
    if row is None or row.revoked_at is not None:
        raise Unauthorized("the API key is not valid (unknown or revoked)", invalid_token=True)
    return Principal(key_id=row.id, admin=row.admin, scope=row.id)


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _seen_off_loopback(peer: Any) -> bool:
    """True when a connection address is an IP address that is not loopback.

    Only real sockets give IP addresses; in-process transports (Starlette's TestClient says
    "testserver") prove nothing either way.
    """
    host = peer[0] if isinstance(peer, list | tuple) and peer else None
    if not isinstance(host, str):
        return False
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return not is_loopback(host)


def mode(settings: Settings, *, server: Any = None, client: Any = None) -> str:
    """How a request is authenticated: ``required``, ``disabled``, or ``disabled (loopback only)``.

    ``server`` and ``client`` are the ASGI scope's connection addresses, when there is a request.
    """
    if settings.auth == "required":
        return "required"
    if settings.auth == "disabled":
        return "disabled"
    if not is_loopback(settings.api_host):
        return "required"
    if _seen_off_loopback(server) or _seen_off_loopback(client):
        return "required"
    return "disabled (loopback only)"


def describe(settings: Settings) -> str:
    """The auth mode for a start-up line, with how many keys could be used."""
    current = mode(settings)
    if current != "required":
        return current
    from core.store.db import session_scope

    with session_scope(settings.db_url) as session:
        active = sum(1 for k in list_keys(session) if k.revoked_at is None)
    if settings.admin_key is not None:
        return f"required ({active} active keys + MEDTUNE_ADMIN_KEY)"
    if not active:
        return "required, but no API key exists yet: create one with 'medtune keys create'"
    return f"required ({active} active keys)"
