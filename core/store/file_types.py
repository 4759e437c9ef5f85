"""What an upload may be: its name made safe, the type its suffix claims, and whether its
first bytes look like that type (checked before anything else reads the file)."""

from __future__ import annotations

import json
import os
import re
import unicodedata
import zipfile
from pathlib import Path

from core.errors import MedtuneError
from core.spec import ARCHIVE_SUFFIXES, DATA_SUFFIXES

UPLOAD_SUFFIXES = DATA_SUFFIXES + ARCHIVE_SUFFIXES
_MAX_NAME_BYTES = 200  # well under the 255 bytes a file name may take on disk
_WINDOWS_UNSAFE = re.compile(r'[<>:"|?*]')
HEAD_BYTES = 64 * 1024  # enough of the start of a file to tell what it is


class UnsupportedFileType(MedtuneError):
    code = "unsupported_file_type"
    status = 415


def kinds() -> str:
    return ", ".join(UPLOAD_SUFFIXES[:-2]) + " or a MedQuAD " + " / ".join(ARCHIVE_SUFFIXES)


# --- names --------------------------------------------------------------------------------------


def sanitize_filename(raw: str) -> str:
    """The client's file name made safe to store and show: its last path part, no control or
    format characters, no leading dots, at most 200 bytes (the suffix kept)."""
    name = unicodedata.normalize("NFC", raw or "")
    name = re.split(r"[/\\]", name)[-1]  # a browser may send C:\\Users\\x\\data.jsonl
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C")
    name = _WINDOWS_UNSAFE.sub("_", name).strip().lstrip(".").strip()
    if len(name.encode()) > _MAX_NAME_BYTES:
        stem, suffix = os.path.splitext(name)
        suffix = suffix[:16]
        budget = _MAX_NAME_BYTES - len(suffix.encode())
        stem = stem.encode()[:budget].decode(errors="ignore")
        name = stem + suffix
    return name


def upload_suffix(filename: str) -> str:
    """The type an upload claims by its (sanitised) name; refused unless medtune reads it."""
    suffix = Path(filename).suffix.lower() if filename else ""
    if suffix not in UPLOAD_SUFFIXES:
        shown = repr(filename) if filename else "the file (it has no name)"
        raise UnsupportedFileType(
            f"{shown} is not a dataset type this server reads; upload {kinds()} file "
            "(the type is taken from the name's suffix)",
            field="file",
        )
    return suffix


# --- content checks -----------------------------------------------------------------------------


def _text(head: bytes, *, complete: bool) -> str | None:
    """The head as UTF-8 text (a character cut at the end of a partial head is allowed)."""
    if b"\x00" in head:
        return None
    try:
        return head.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if not complete and exc.start >= len(head) - 3:
            return head[: exc.start].decode("utf-8-sig", errors="strict")
        return None


def looks_like(suffix: str, path: Path, head: bytes, tail: bytes, *, complete: bool) -> bool:
    if suffix == ".parquet":
        return head[:4] == b"PAR1" and tail[-4:] == b"PAR1"
    if suffix == ".zip":
        if not zipfile.is_zipfile(path):
            return False
        try:
            with zipfile.ZipFile(path) as archive:
                return any(n.lower().endswith(".xml") for n in archive.namelist())
        except (zipfile.BadZipFile, OSError):
            return False
    text = _text(head, complete=complete)
    if text is None:
        return False
    body = text.lstrip()
    if suffix == ".json":
        return body[:1] in ("[", "{")
    if suffix == ".xml":
        return body[:1] == "<"
    if suffix == ".csv":
        return bool(body.splitlines()[0].strip()) if body else False
    # .jsonl: the first line is a JSON object (or, cut off by the head, starts like one).
    first, newline, _ = body.partition("\n")
    if not newline and not complete:
        return first.startswith("{")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


WHAT = {
    ".jsonl": "JSON Lines (one JSON object per line)",
    ".json": "JSON (a list of objects, or {'data': [...]})",
    ".csv": "UTF-8 CSV text with a header row",
    ".parquet": "a Parquet file",
    ".zip": "a zip archive holding MedQuAD .xml documents",
    ".xml": "an XML document",
}
