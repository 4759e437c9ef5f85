"""What the /files tests share: sample bytes of each accepted type, an upload call, and where
the in-process API stores uploads."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fastapi.testclient import TestClient

from core.store import files
from core.store.db import session_scope
from core.store.models import DataFile
from tests.helpers import SAMPLE

ROWS = SAMPLE.read_bytes().splitlines(keepends=True)
JSONL = b"".join(ROWS[:6])
MEDQUAD_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Document id="0000001" source="GHR">'
    b"<Focus>Anemia</Focus><QAPairs><QAPair pid='1'><Question qid='1' qtype='symptoms'>"
    b"What are the symptoms of anemia?</Question><Answer>Tiredness and pale skin.</Answer>"
    b"</QAPair></QAPairs></Document>\n"
)


def upload(
    client: TestClient,
    name: str,
    content: bytes,
    *,
    path: str = "/files",
    headers: dict[str, str] | None = None,
    purpose: str | None = "fine-tune",
) -> Any:
    data = {"purpose": purpose} if purpose is not None else None
    return client.post(path, files={"file": (name, content)}, data=data, headers=headers)


def uploads_dir(home: Path) -> Path:
    return home / "data" / "uploads"


def stored(home: Path) -> list[Path]:
    """Every entry of the uploads folder (file folders and any staging left behind)."""
    folder = uploads_dir(home)
    return sorted(folder.iterdir()) if folder.exists() else []


def file_rows(db_url: str) -> list[DataFile]:
    with session_scope(db_url) as s:
        return list(files.list_files(s, limit=100)[0])


def parquet_bytes() -> bytes:
    buffer = io.BytesIO()
    table = pa.table({"question": ["What is a fever?"], "answer": ["A raised temperature."]})
    pq.write_table(table, buffer)
    return buffer.getvalue()
