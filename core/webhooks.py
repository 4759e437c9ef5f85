"""Webhooks: a job's final status POSTed to the URL its spec names, signed, retried, recorded.

The job row is the outbox: a job whose spec has a ``webhook`` is stored with ``webhook_state``
``pending``; once the job is terminal (succeeded, failed, cancelled, by whatever path: a worker,
a cancel of a queued job) a worker's delivery loop (worker/webhooks.py) claims it, POSTs the
event and records the attempt. Delivery never touches the job's status, and a restarted worker
picks up what was pending, so it neither blocks nor fails a job.

The event has OpenAI's shape (``{"object": "event", "id", "type", "created_at", "data"}``)
and is signed as Standard Webhooks (and OpenAI's webhooks) sign: headers ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature: v1,<base64 HMAC-SHA256 of
"<id>.<timestamp>.<body>">``, so receivers can check it with those libraries. The id stays the
same across retries: a receiver drops repeats by it.

Targets: only http(s), and (unless ``MEDTUNE_WEBHOOK_ALLOW_PRIVATE``) no loopback, private,
link-local or otherwise non-public address, checked at submit and again, after DNS resolution,
before each attempt; the attempt then connects only to the addresses checked
(core/webhook_transport.py), never to what a second lookup of the name answers. Redirects are
not followed (a redirect could point inward).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
import uuid
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import or_, update
from sqlmodel import Session, col, select

from core import webhook_transport
from core.errors import SpecError
from core.settings import Settings
from core.store.jobs import TERMINAL
from core.store.models import Job, utcnow

log = logging.getLogger(__name__)
FIELD = "webhook.url"
MAX_DELAY_S = 300.0  # backoff doubles from webhook_backoff_s up to this


class WebhookUrlInvalid(SpecError):
    code = "webhook_url_invalid"


class WebhookUrlPrivate(SpecError):
    code = "webhook_url_private"


class WebhookUrlUnresolvable(SpecError):
    code = "webhook_url_unresolvable"


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_target(url: str, *, allow_private: bool) -> list[str]:
    """The addresses ``url``'s host resolves to (the resolver's order), all of them allowed
    targets; else a 422."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookUrlInvalid(
            f"webhook.url {url[:100]!r} is not an http(s) URL with a host; give one like "
            "https://example.com/hooks/medtune",
            field=FIELD,
        )
    try:
        httpx.URL(url)  # what delivery sends: a control character or an odd port is refused here
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except (httpx.InvalidURL, ValueError) as exc:
        raise WebhookUrlInvalid(
            f"webhook.url {url[:100]!r} cannot be sent ({exc}); give one like "
            "https://example.com/hooks/medtune",
            field=FIELD,
        ) from exc
    if parts.username or parts.password:
        raise WebhookUrlInvalid(
            "webhook.url carries credentials; remove them (deliveries are signed with "
            "webhook.secret instead)",
            field=FIELD,
        )
    try:
        found = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except (OSError, ValueError) as exc:
        raise WebhookUrlUnresolvable(
            f"webhook.url's host {parts.hostname!r} does not resolve ({exc}); check the name",
            field=FIELD,
        ) from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
    private = [a for a in addresses if not _is_public(a)]
    if private and not allow_private:
        raise WebhookUrlPrivate(
            f"webhook.url's host {parts.hostname!r} resolves to a loopback, private or "
            f"otherwise non-public address ({', '.join(private[:3])}); give a public URL (a "
            "server may allow private targets with MEDTUNE_WEBHOOK_ALLOW_PRIVATE)",
            field=FIELD,
        )
    return addresses


def signing_key(secret: str) -> bytes:
    """A ``whsec_<base64>`` secret is its decoded bytes (Standard Webhooks); else its UTF-8."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except ValueError:
            pass
    return secret.encode()


def sign(secret: str, *, event_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.new(signing_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _stamp(value: datetime | None) -> int:
    if value is None:
        return int(time.time())
    return int(value.replace(tzinfo=value.tzinfo or utcnow().tzinfo).timestamp())


def event_for(job: Job, event_id: str) -> dict[str, Any]:
    error = {"code": job.error_code, "message": job.error_message} if job.error_code else None
    return {
        "object": "event",
        "id": event_id,
        "type": f"job.{job.status}",
        "created_at": _stamp(job.finished_at),
        "data": {
            "id": job.id,
            "object": "job",
            "status": job.status,
            "finetuned_model": job.finetuned_model,
            "steps_done": job.steps_done,
            "error": error,
        },
    }


def _claim(session: Session, job_id: str, *, now: datetime, hold_s: float) -> bool:
    """Take a due delivery for this attempt; a second worker's claim then finds it not due."""
    result = session.execute(
        update(Job)
        .where(
            col(Job.id) == job_id,
            col(Job.webhook_state) == "pending",
            or_(col(Job.webhook_next_at).is_(None), col(Job.webhook_next_at) <= now),
        )
        .values(webhook_next_at=now + timedelta(seconds=hold_s))
    )
    session.commit()
    return bool(result.rowcount)


def attempt(session: Session, job: Job, settings: Settings) -> dict[str, Any]:
    """One delivery attempt of a claimed job's event; records it on the row and returns it."""
    hook = (job.spec or {}).get("webhook") or {}
    record = dict(job.webhook_delivery or {})
    record.setdefault("event_id", "evt_" + uuid.uuid4().hex[:24])
    now = utcnow()
    record.setdefault("first_attempt_at", now.isoformat())
    event = event_for(job, record["event_id"])
    record |= {"type": event["type"], "attempts": record.get("attempts", 0) + 1}
    record["last_attempt_at"] = now.isoformat()
    status, error, final = None, None, False
    try:
        addresses = check_target(hook["url"], allow_private=settings.webhook_allow_private)
        body = json.dumps(event, separators=(",", ":")).encode()
        stamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "medtune-webhooks",
            "webhook-id": record["event_id"],
            "webhook-timestamp": str(stamp),
            "webhook-signature": sign(
                hook["secret"], event_id=record["event_id"], timestamp=stamp, body=body
            ),
        }
        status = webhook_transport.post(
            hook["url"], addresses, body=body, headers=headers, timeout_s=settings.webhook_timeout_s
        )
        if not 200 <= status < 300:
            error = f"HTTP {status}"
    except SpecError as exc:  # the host now resolves inward: never retried
        error, final = exc.code, True
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {str(exc)[:200]}"
    record |= {"last_status": status, "last_error": error}
    values: dict[str, Any] = {"webhook_next_at": None}
    if error is None:
        record["delivered_at"] = utcnow().isoformat()
        values["webhook_state"] = "delivered"
    else:
        delay = min(settings.webhook_backoff_s * 2 ** (record["attempts"] - 1), MAX_DELAY_S)
        spent = (now - datetime.fromisoformat(record["first_attempt_at"])).total_seconds()
        if final or spent + delay > settings.webhook_retry_s:
            values["webhook_state"] = "failed"
        else:
            # From the failed attempt's end: a slow receiver still gets its whole backoff.
            values["webhook_next_at"] = utcnow() + timedelta(seconds=delay)
    session.execute(
        update(Job).where(col(Job.id) == job.id).values(webhook_delivery=record, **values)
    )
    session.commit()
    log.info(
        "webhook %s of job %s: attempt %d, %s",
        event["type"],
        job.id,
        record["attempts"],
        error or f"HTTP {status}",
    )
    return record


def deliver_due(session: Session, settings: Settings, *, limit: int = 20) -> list[dict[str, Any]]:
    """Attempt every due delivery of a terminal job (at most ``limit``); returns the records."""
    now = utcnow()
    due = session.exec(
        select(Job.id)
        .where(
            col(Job.webhook_state) == "pending",
            col(Job.status).in_(TERMINAL),
            or_(col(Job.webhook_next_at).is_(None), col(Job.webhook_next_at) <= now),
        )
        .limit(limit)
    ).all()
    done = []
    for job_id in due:
        if _claim(session, job_id, now=now, hold_s=settings.webhook_timeout_s + 30):
            job = session.get(Job, job_id)
            if job is not None:
                session.refresh(job)
                done.append(attempt(session, job, settings))
    return done
