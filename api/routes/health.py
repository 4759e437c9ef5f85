"""/healthz: liveness plus a database round trip."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from api.deps import SessionDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def health(session: SessionDep) -> dict[str, str]:
    """200 when the API and its job store answer."""
    session.exec(text("SELECT 1"))  # type: ignore[call-overload]
    return {"status": "ok"}
