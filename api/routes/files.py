"""/files: upload dataset files, list, read, download and delete them.

A job names an uploaded file by id in ``training_dataset.name`` (``file-...``). Files belong to
the API key that uploaded them, as jobs do: another key gets 404 ``file_not_found``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from api.deps import IdempotencyKeyHeader, PrincipalDep, SessionDep, SettingsDep
from api.schemas import _Out
from api.uploads import UPLOAD_BODY, accept_upload, download
from core.store import files
from core.store.models import DataFile

router = APIRouter(prefix="/files", tags=["files"])

Limit = Annotated[int, Query(ge=1, le=100)]
After = Annotated[str | None, Query(max_length=40, description="The last id of the previous page.")]


class FilePublic(_Out):
    id: str
    object: Literal["file"] = "file"
    filename: str = Field(description="The name sent, without folders or control characters.")
    purpose: str
    bytes: int
    sha256: str
    created_at: datetime

    @classmethod
    def of(cls, row: DataFile) -> FilePublic:
        return cls(
            id=row.id,
            filename=row.filename,
            purpose=row.purpose,
            bytes=row.bytes,
            sha256=row.sha256,
            created_at=row.created_at,
        )


class FilesPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[FilePublic]
    has_more: bool
    last_id: str | None = Field(description="Pass as after to get the next page.")


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


@router.post("", status_code=201, response_model=FilePublic, openapi_extra=UPLOAD_BODY)
async def upload_file(
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> FilePublic:
    """Upload a dataset file (multipart ``file``, optional ``purpose``); checked and stored."""
    row, replayed = await accept_upload(request, session, settings, principal, idempotency_key)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return FilePublic.of(row)


@router.get("", response_model=FilesPublic)
def list_files(
    session: SessionDep,
    principal: PrincipalDep,
    limit: Limit = 20,
    after: After = None,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
) -> FilesPublic:
    """Your files, newest first; pass last_id as after for older ones."""
    page, has_more = files.list_files(
        session, owner=principal.job_owner, limit=limit, after=after, purpose=purpose
    )
    return FilesPublic(
        data=[FilePublic.of(r) for r in page],
        has_more=has_more,
        last_id=page[-1].id if page else None,
    )


@router.get("/{file_id}", response_model=FilePublic)
def read_file(session: SessionDep, principal: PrincipalDep, file_id: str) -> FilePublic:
    """One file's name, size, SHA-256 and upload time."""
    return FilePublic.of(files.get_file(session, file_id, owner=principal.job_owner))


@router.get("/{file_id}/content", response_class=FileResponse)
def read_file_content(
    session: SessionDep, settings: SettingsDep, principal: PrincipalDep, file_id: str
) -> FileResponse:
    """The file's bytes as uploaded (streamed)."""
    row = files.get_file(session, file_id, owner=principal.job_owner)
    return download(row, settings.uploads_dir)


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(
    session: SessionDep, settings: SettingsDep, principal: PrincipalDep, file_id: str
) -> FileDeleted:
    """Delete the file and its bytes; 409 file_in_use while a queued or running job uses it."""
    files.delete_file(session, file_id, owner=principal.job_owner, uploads_dir=settings.uploads_dir)
    return FileDeleted(id=file_id)
