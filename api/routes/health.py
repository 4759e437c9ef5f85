"""/healthz: liveness plus a database round trip."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy import text

from api.deps import SessionDep, SettingsDep, auth_mode

router = APIRouter(tags=["health"])


@router.get("/healthz")
def health(request: Request, session: SessionDep, settings: SettingsDep) -> dict[str, str]:
    """200 when the API and its job store answer; says whether requests need an API key."""
    session.exec(text("SELECT 1"))  # type: ignore[call-overload]
    return {"status": "ok", "auth": auth_mode(request, settings)}
