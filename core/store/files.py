"""Uploaded dataset files: streamed to disk, checked, stored, owned by the key that sent them.

An upload is written chunk by chunk into a staging folder under ``$MEDTUNE_HOME/data/uploads``
(the size limit is enforced as the bytes arrive, the SHA-256 computed on the way), its type is
checked by name and by content, and the folder is renamed to ``uploads/<file id>/`` in one
step, so a file id's folder is complete or absent. Then the ``files`` row is committed (with its
Idempotency-Key row, when one was sent). A job spec names the file by id (``file-...`` or
``file:file-...`` as ``training_dataset.name``, a mix source's name or ``validation_dataset.name``);
the API checks that the caller owns it, and the worker finds the bytes by id under its own data
folder (core.data.sources).

Deleting a file that a queued or running job reads is refused (409 ``file_in_use``): a job needs
its file until its data stage is over, and a requeued job reads it again. A finished job needs
nothing more from it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from sqlalchemy import and_, delete, or_
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from core.errors import ConflictError, DatasetNotFound, MedtuneError, NotFoundError
from core.spec import FILE_REF
from core.store import idempotency
from core.store.file_types import (
    HEAD_BYTES,
    WHAT,
    UnsupportedFileType,
    kinds,
    looks_like,
    sanitize_filename,
    upload_suffix,
)
from core.store.models import DataFile, IdempotencyKey, Job, JobStatus, new_file_id

PURPOSES = ("fine-tune",)
STAGING_PREFIX = ".staging-"
STALE_STAGING_S = 24 * 3600  # a staging folder this old belongs to an upload that died
ACTIVE = (JobStatus.queued.value, JobStatus.running.value)


class FileNotFound(NotFoundError):
    code = "file_not_found"


class FileTooLarge(MedtuneError):
    code = "file_too_large"
    status = 413


class FileEmpty(MedtuneError):
    code = "file_empty"
    status = 422


class FileInUse(ConflictError):
    code = "file_in_use"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} bytes"


def too_large(max_bytes: int) -> FileTooLarge:
    return FileTooLarge(
        f"the file is larger than this server's upload limit of {_size(max_bytes)} "
        f"({max_bytes} bytes, MEDTUNE_MAX_UPLOAD_BYTES); split it, or put it in a folder the "
        "server reads (MEDTUNE_DATA_ROOTS) and name its path",
        field="file",
    )


# --- streaming to disk --------------------------------------------------------------------------


class Upload:
    """One file being received: written to a staging folder, measured and hashed as it comes.

    ``write`` each chunk, then ``finish`` (checks the content) and :func:`store`; on any error
    ``discard`` removes what was written.
    """

    def __init__(self, *, uploads_dir: Path, filename: str, max_bytes: int) -> None:
        self.filename = sanitize_filename(filename)
        self.suffix = upload_suffix(self.filename)
        self.max_bytes = max_bytes
        self.uploads_dir = uploads_dir
        uploads_dir.mkdir(parents=True, exist_ok=True)
        _sweep_stale_staging(uploads_dir)
        self.staging = uploads_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        self.staging.mkdir()
        self.path = self.staging / self.filename
        self.size = 0
        self._hash = hashlib.sha256()
        self._head = bytearray()
        self._tail = b""
        self._fh: IO[bytes] | None = self.path.open("xb")

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self.size + len(chunk) > self.max_bytes:
            self.discard()
            raise too_large(self.max_bytes)
        assert self._fh is not None, "write after finish or discard"
        self._fh.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)
        if len(self._head) < HEAD_BYTES:
            self._head += chunk[: HEAD_BYTES - len(self._head)]
        self._tail = (self._tail + chunk)[-8:]

    def finish(self) -> None:
        """Close the file and check that its content is what its name says."""
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
        if self.size == 0:
            self.discard()
            raise FileEmpty(f"{self.filename!r} is empty; upload a file with rows", field="file")
        head, complete = bytes(self._head), self.size <= HEAD_BYTES
        if not looks_like(self.suffix, self.path, head, self._tail, complete=complete):
            self.discard()
            raise UnsupportedFileType(
                f"{self.filename!r} does not hold what its name says: expected "
                f"{WHAT[self.suffix]}; fix the file or its name ({kinds()})",
                field="file",
            )

    def discard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        shutil.rmtree(self.staging, ignore_errors=True)


def _sweep_stale_staging(uploads_dir: Path) -> None:
    """Remove staging folders of uploads that died (the API process was killed mid-upload)."""
    cutoff = time.time() - STALE_STAGING_S
    for entry in uploads_dir.glob(STAGING_PREFIX + "*"):
        try:
            if entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


# --- the store ----------------------------------------------------------------------------------


def file_dir(uploads_dir: Path, file_id: str) -> Path:
    """The folder holding an uploaded file's bytes (its only entry is the file)."""
    if not FILE_REF.fullmatch(file_id) or file_id.startswith("file:"):
        raise FileNotFound(f"{file_id!r} is not a file id", field="file_id")
    return uploads_dir / file_id


def stored_path(uploads_dir: Path, file_id: str) -> Path | None:
    """The stored bytes of a file id, found by id alone (no database), or None."""
    folder = file_dir(uploads_dir, file_id)
    if not folder.is_dir():
        return None
    entries = [p for p in folder.iterdir() if p.is_file()]
    return entries[0] if len(entries) == 1 else None


def store(
    session: Session,
    upload: Upload,
    *,
    purpose: str = "fine-tune",
    owner_key_id: str | None = None,
    idempotency_scope: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[DataFile, bool]:
    """Move a finished upload into place and record it; returns (file, replayed).

    With an Idempotency-Key, an earlier upload of the same bytes, name and purpose under that
    key is returned instead (replayed True, the new bytes dropped); another upload under the
    key is a 409.
    """
    fingerprint = idempotency.upload_fingerprint(
        sha256=upload.sha256, filename=upload.filename, purpose=purpose
    )
    keyed = idempotency_scope is not None and idempotency_key is not None
    if keyed:
        try:
            earlier = idempotency.replay_upload(
                session, scope=idempotency_scope, key=idempotency_key, upload=fingerprint
            )
        except MedtuneError:
            upload.discard()
            raise
        if earlier is not None:
            upload.discard()
            return earlier, True
    file_id = new_file_id()
    final = file_dir(upload.uploads_dir, file_id)
    os.replace(upload.staging, final)  # one rename: the id's folder is complete or absent
    row = DataFile(
        id=file_id,
        filename=upload.filename,
        purpose=purpose,
        bytes=upload.size,
        sha256=upload.sha256,
        path=str(final / upload.filename),
        owner_key_id=owner_key_id,
    )
    try:
        session.add(row)
        if keyed:
            session.flush()  # the file row first: the key row refers to it
            session.add(
                IdempotencyKey(
                    scope=idempotency_scope,
                    key=idempotency_key,
                    fingerprint=fingerprint,
                    file_id=file_id,
                )
            )
        session.commit()
    except IntegrityError:
        session.rollback()
        shutil.rmtree(final, ignore_errors=True)
        if not keyed:
            raise
        # A concurrent request with the same key committed first: answer with its file.
        found = idempotency.replay_upload(
            session, scope=idempotency_scope, key=idempotency_key, upload=fingerprint
        )
        if found is None:
            raise
        return found, True
    except BaseException:
        session.rollback()
        shutil.rmtree(final, ignore_errors=True)
        raise
    session.refresh(row)
    return row, False


def get_file(
    session: Session, file_id: str, *, owner: str | None = None, field: str = "file_id"
) -> DataFile:
    """The file; with ``owner``, only if that API key uploaded it (else the same 404)."""
    row = session.get(DataFile, file_id)
    if row is None or (owner is not None and row.owner_key_id != owner):
        raise FileNotFound(f"no file with id {file_id!r}", field=field)
    return row


def list_files(
    session: Session,
    *,
    owner: str | None = None,
    limit: int = 20,
    after: str | None = None,
    purpose: str | None = None,
    oldest_first: bool = False,
) -> tuple[Sequence[DataFile], bool]:
    """Newest (or oldest) first, past the file id ``after`` (the previous page's last).

    Returns (page, has_more).
    """
    query = select(DataFile)
    if owner is not None:
        query = query.where(DataFile.owner_key_id == owner)
    if purpose:
        query = query.where(DataFile.purpose == purpose)
    created, file_id = col(DataFile.created_at), col(DataFile.id)
    if after:
        last = get_file(session, after, owner=owner, field="after")
        if oldest_first:
            past = or_(
                created > last.created_at, and_(created == last.created_at, file_id > last.id)
            )
        else:
            past = or_(
                created < last.created_at, and_(created == last.created_at, file_id < last.id)
            )
        query = query.where(past)
    order = (created.asc(), file_id.asc()) if oldest_first else (created.desc(), file_id.desc())
    rows = session.exec(query.order_by(*order).limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit


def content_path(row: DataFile, uploads_dir: Path) -> Path:
    """Where the file's bytes are; 404 ``file_content_missing`` if they are gone from disk."""
    path = stored_path(uploads_dir, row.id)
    if path is None:
        raise NotFoundError(
            f"the bytes of file {row.id} are missing on the server; upload it again",
            field="file_id",
            code="file_content_missing",
        )
    return path


# --- files named by job specs -------------------------------------------------------------------


def file_refs(spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, file id) for every uploaded file a job spec's datasets and benchmarks name."""
    found: list[tuple[str, str]] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                here = f"{where}.{key}"
                if key == "name" and isinstance(value, str):
                    match = FILE_REF.fullmatch(value)
                    if match:
                        found.append((here, match.group(1)))
                else:
                    walk(value, here)
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")

    walk(spec.get("training_dataset"), "training_dataset")
    walk(spec.get("validation_dataset"), "validation_dataset")
    evaluation = spec.get("evaluation_config")
    benchmarks = evaluation.get("benchmarks") if isinstance(evaluation, Mapping) else None
    for i, bench in enumerate(benchmarks or []):
        name = bench.get("file") if isinstance(bench, Mapping) else None
        if isinstance(name, str) and (match := FILE_REF.fullmatch(name)):
            found.append((f"evaluation_config.benchmarks[{i}].file", match.group(1)))
    return found


def check_spec_files(session: Session, spec: Mapping[str, Any], *, owner: str | None) -> None:
    """Every file the spec names exists and is the caller's (404 ``file_not_found`` otherwise).

    The rows are read with FOR SHARE (Postgres), so a concurrent DELETE waits until the job
    that names them is committed, and then sees it (409 file_in_use) instead of removing them.
    """
    for field, file_id in file_refs(spec):
        row = session.exec(
            select(DataFile).where(DataFile.id == file_id).with_for_update(read=True)
        ).first()
        if row is None or (owner is not None and row.owner_key_id != owner):
            raise FileNotFound(
                f"no uploaded file with id {file_id!r}; upload it with POST /files and use the "
                "id it returns",
                field=field,
            )


def jobs_using(session: Session, file_id: str) -> list[str]:
    """Ids of the queued or running jobs whose spec names the file."""
    rows = session.exec(select(Job.id, Job.spec).where(col(Job.status).in_(ACTIVE))).all()
    return [job_id for job_id, spec in rows if any(f == file_id for _, f in file_refs(spec))]


def delete_file(
    session: Session, file_id: str, *, owner: str | None, uploads_dir: Path
) -> DataFile:
    """Delete the row, its Idempotency-Key rows and its bytes; 409 while a job needs it."""
    row = session.exec(select(DataFile).where(DataFile.id == file_id).with_for_update()).first()
    if row is None or (owner is not None and row.owner_key_id != owner):
        raise FileNotFound(f"no file with id {file_id!r}", field="file_id")
    users = jobs_using(session, file_id)
    if users:
        shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
        raise FileInUse(
            f"file {file_id} is the dataset of queued or running job(s) {shown}; cancel them or "
            "wait until they end, then delete it",
            field="file_id",
        )
    session.execute(delete(IdempotencyKey).where(col(IdempotencyKey.file_id) == file_id))
    session.delete(row)
    session.commit()
    # The row went first: a crash here leaves bytes no id leads to, never an id without bytes.
    shutil.rmtree(file_dir(uploads_dir, file_id), ignore_errors=True)
    return row


def resolve(name: str, uploads_dir: Path) -> Path:
    """The stored bytes a dataset name of kind ``file`` leads to (the worker's look-up)."""
    match = FILE_REF.fullmatch(name)
    path = stored_path(uploads_dir, match.group(1)) if match else None
    if path is None:
        raise DatasetNotFound(
            f"uploaded file {name!r} does not exist on this server (deleted, or never uploaded "
            "here); upload it with POST /files and use the id it returns",
            field="training_dataset.name",
        )
    return path
