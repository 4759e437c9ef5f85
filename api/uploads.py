"""Streaming multipart uploads for POST /files and POST /v1/files, and their downloads.

Starlette's ``request.form()`` spools a whole file to the system temp folder before a route
runs, so no size limit could act while the bytes arrive. Here the body is parsed as it streams
(python-multipart) and the ``file`` part goes chunk by chunk into a core.store.files.Upload
under the data folder: past the limit the upload stops at once with 413 ``file_too_large``.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlmodel import Session

from core import auth
from core.errors import MedtuneError
from core.settings import Settings
from core.store import files
from core.store.models import DataFile

FIELD_LIMIT = 1024  # bytes of a text field (purpose)
# Multipart headers and boundaries around the file: a Content-Length past the limit plus this
# is refused before a byte is read.
ENVELOPE_BYTES = 64 * 1024
FORM_FIELDS = ("file", "purpose")

UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "The dataset: .jsonl, .json, .csv, .parquet, or "
                            "MedQuAD as a .zip of its XML files or one .xml",
                        },
                        "purpose": {
                            "type": "string",
                            "enum": list(files.PURPOSES),
                            "default": "fine-tune",
                        },
                    },
                }
            }
        },
    }
}


class InvalidUpload(MedtuneError):
    code = "invalid_upload"
    status = 400


class NotMultipart(MedtuneError):
    code = "unsupported_media_type"
    status = 415


class InvalidForm(MedtuneError):
    """A form field that is unknown, repeated, too long or missing (the code says which)."""

    status = 422


def _form_error(detail: str, *, field: str, code: str) -> MedtuneError:
    return InvalidForm(detail, field=field, code=code)


class _Receiver:
    """python-multipart callbacks: the file part into an Upload, text fields into memory."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.upload: files.Upload | None = None
        self.fields: dict[str, bytearray] = {}
        self.file_done = False
        self.ended = False
        self._current: str | None = None
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self._current, self._disposition = None, b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        raw_name = options.get(b"name")
        if raw_name is None:
            raise InvalidUpload(
                "a form part has no name in its Content-Disposition header", field="body"
            )
        name = raw_name.decode("utf-8", errors="replace")
        if name not in FORM_FIELDS:
            raise _form_error(
                f"unknown form field {name!r}; send 'file' and, optionally, 'purpose'",
                field=name,
                code="unknown_field",
            )
        if name in self.fields or (name == "file" and self.upload is not None):
            raise _form_error(
                f"form field {name!r} was sent twice; send one file per request",
                field=name,
                code="invalid_value",
            )
        self._current = name
        if name != "file":
            self.fields[name] = bytearray()
            return
        if b"filename" not in options:
            raise _form_error(
                "'file' must be a file part with a filename (curl -F file=@data.jsonl)",
                field="file",
                code="invalid_value",
            )
        self.upload = files.Upload(
            uploads_dir=self.settings.uploads_dir,
            filename=options[b"filename"].decode("utf-8", errors="replace"),
            max_bytes=self.settings.max_upload_bytes,
        )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._current == "file":
            assert self.upload is not None
            self.upload.write(chunk)
            return
        assert self._current is not None
        buffer = self.fields[self._current]
        if len(buffer) + len(chunk) > FIELD_LIMIT:
            raise _form_error(
                f"form field {self._current!r} is longer than {FIELD_LIMIT} bytes",
                field=self._current,
                code="out_of_range",
            )
        buffer += chunk

    def on_part_end(self) -> None:
        if self._current == "file":
            self.file_done = True

    def on_end(self) -> None:
        self.ended = True

    def purpose(self) -> str:
        raw = self.fields.get("purpose")
        value = raw.decode("utf-8", errors="replace").strip() if raw is not None else "fine-tune"
        if value not in files.PURPOSES:
            raise _form_error(
                f"purpose {value!r} is not one this server takes; use "
                + " or ".join(repr(p) for p in files.PURPOSES),
                field="purpose",
                code="invalid_choice",
            )
        return value


async def receive_upload(request: Request, settings: Settings) -> tuple[files.Upload, str]:
    """Stream a multipart body's ``file`` to disk; returns the finished upload and its purpose."""
    kind, params = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise NotMultipart(
            "send the file as multipart/form-data with a 'file' part "
            "(curl -F file=@data.jsonl -F purpose=fine-tune)",
            field="file",
        )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > settings.max_upload_bytes + ENVELOPE_BYTES:
        raise files.too_large(settings.max_upload_bytes)
    receiver = _Receiver(settings)
    parser = MultipartParser(params[b"boundary"], receiver.callbacks())
    try:
        async for chunk in request.stream():
            # File writes and hashing off the event loop, as Starlette's own parser does.
            await run_in_threadpool(parser.write, chunk)
        parser.finalize()
        if receiver.upload is None:
            raise _form_error(
                "no 'file' part in the form; send the dataset as 'file' (curl -F file=@data.jsonl)",
                field="file",
                code="missing_field",
            )
        if not (receiver.file_done and receiver.ended):
            raise InvalidUpload(
                "the multipart body ended before its closing boundary (the upload was cut off)",
                field="file",
            )
        purpose = receiver.purpose()
        await run_in_threadpool(receiver.upload.finish)
    except FormParserError as exc:
        if receiver.upload is not None:
            receiver.upload.discard()
        raise InvalidUpload(f"the multipart body is malformed: {exc}", field="body") from exc
    except BaseException:
        if receiver.upload is not None:
            receiver.upload.discard()
        raise
    return receiver.upload, purpose


async def accept_upload(
    request: Request,
    session: Session,
    settings: Settings,
    principal: auth.Principal,
    idempotency_key: str | None,
) -> tuple[DataFile, bool]:
    """Receive, check and store an upload for ``principal``; returns (file, replayed)."""
    upload, purpose = await receive_upload(request, settings)
    return await run_in_threadpool(
        files.store,
        session,
        upload,
        purpose=purpose,
        owner_key_id=principal.key_id,
        idempotency_scope=principal.scope if idempotency_key else None,
        idempotency_key=idempotency_key,
    )


# The types medtune reads, for a download's Content-Type.
MEDIA_TYPES = {
    ".jsonl": "application/jsonl",
    ".json": "application/json",
    ".csv": "text/csv",
    ".parquet": "application/vnd.apache.parquet",
    ".zip": "application/zip",
    ".xml": "application/xml",
}


def download(row: DataFile, uploads_dir: Path, *, media_type: str | None = None) -> FileResponse:
    """The stored bytes as a download, with the file's SHA-256 in X-Checksum-Sha256."""
    path = files.content_path(row, uploads_dir)
    guessed = MEDIA_TYPES.get(path.suffix.lower()) or mimetypes.guess_type(row.filename)[0]
    return FileResponse(
        path,
        filename=row.filename,
        media_type=media_type or guessed or "application/octet-stream",
        headers={"X-Checksum-Sha256": row.sha256},
    )
