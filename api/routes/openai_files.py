"""/v1/files: OpenAI's Files endpoints over medtune's uploaded files.

A file uploaded here is the same file as one from POST /files (listed by both), and its id is
what ``training_file`` on POST /v1/fine_tuning/jobs takes. Errors stay application/problem+json,
as on /v1/fine_tuning.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel

from api.deps import IdempotencyKeyHeader, PrincipalDep, SessionDep, SettingsDep
from api.uploads import UPLOAD_BODY, accept_upload, download
from core.openai_shapes import unix
from core.store import files
from core.store.models import DataFile

router = APIRouter(prefix="/v1/files", tags=["openai-compatible"])


class OpenAIFile(BaseModel):
    """OpenAI's File object. Stored files are ready at once: status is always "processed"."""

    object: Literal["file"] = "file"
    id: str
    bytes: int
    created_at: int
    expires_at: int | None = None
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None

    @classmethod
    def of(cls, row: DataFile) -> OpenAIFile:
        return cls(
            id=row.id,
            bytes=row.bytes,
            created_at=unix(row.created_at) or 0,
            filename=row.filename,
            purpose=row.purpose,
        )


class OpenAIFilesPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIFile]
    has_more: bool
    first_id: str | None
    last_id: str | None


class OpenAIFileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


@router.post("", response_model=OpenAIFile, openapi_extra=UPLOAD_BODY)
async def create_file(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> OpenAIFile:
    """Upload a dataset file (multipart ``file`` and ``purpose``: "fine-tune")."""
    row, _ = await accept_upload(request, session, settings, principal, idempotency_key)
    return OpenAIFile.of(row)


@router.get("", response_model=OpenAIFilesPage)
def list_openai_files(
    session: SessionDep,
    principal: PrincipalDep,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: Annotated[str | None, Query(max_length=40)] = None,
    order: Literal["asc", "desc"] = "desc",
) -> OpenAIFilesPage:
    """Your files by created_at (newest first unless order=asc); ``after`` is a file id."""
    page, has_more = files.list_files(
        session,
        owner=principal.job_owner,
        limit=limit,
        after=after,
        purpose=purpose,
        oldest_first=order == "asc",
    )
    return OpenAIFilesPage(
        data=[OpenAIFile.of(r) for r in page],
        has_more=has_more,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
    )


@router.get("/{file_id}", response_model=OpenAIFile)
def retrieve_file(session: SessionDep, principal: PrincipalDep, file_id: str) -> OpenAIFile:
    """One File object."""
    return OpenAIFile.of(files.get_file(session, file_id, owner=principal.job_owner))


@router.delete("/{file_id}", response_model=OpenAIFileDeleted)
def delete_openai_file(
    session: SessionDep, settings: SettingsDep, principal: PrincipalDep, file_id: str
) -> OpenAIFileDeleted:
    """Delete the file; 409 file_in_use while a queued or running job uses it."""
    files.delete_file(session, file_id, owner=principal.job_owner, uploads_dir=settings.uploads_dir)
    return OpenAIFileDeleted(id=file_id)


@router.get("/{file_id}/content", response_class=FileResponse)
def retrieve_file_content(
    session: SessionDep, settings: SettingsDep, principal: PrincipalDep, file_id: str
) -> FileResponse:
    """The file's bytes as uploaded."""
    row = files.get_file(session, file_id, owner=principal.job_owner)
    return download(row, settings.uploads_dir, media_type="application/octet-stream")
