"""MedQuAD as published: one XML document per focus, each with question/answer pairs.

    <Document id="0000007" source="NHLBI" url="...">
      <Focus>ARDS</Focus>
      <QAPairs><QAPair pid="1">
        <Question qid="0000007-1" qtype="information">What is (are) ARDS ?</Question>
        <Answer>ARDS, or acute respiratory distress syndrome, ...</Answer>
      </QAPair></QAPairs>
    </Document>

A few NINDS files use a lower-case variant (<doc corpus=...>, <doctitle-focus>, <qaPairs>,
<pair>, <question>, <answer>). Tags are matched without case or namespace and the root's name is
not checked: any root holding the Focus / QAPairs children is read. Three of the twelve
collections had their answers removed for copyright, so about two thirds of the pairs have an
empty <Answer>; they are skipped and counted, never trained on.

A file that cannot be read (not XML, a foreign root, an encoding that cannot be decoded, a zip
member that cannot be unpacked) fails the read with its own error when ``skip_bad`` is false;
otherwise it is counted under ``bad`` as ``medquad_file_<reason>`` and the caller decides
(core.data.sources.check_bad_share) whether enough is left.
"""

from __future__ import annotations

import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from core.errors import DatasetError

FIELD = "training_dataset.name"
# The published documents are under 1 MB; a larger member is a zip bomb or not MedQuAD.
MAX_DOCUMENT_BYTES = 64 * 2**20
# Tags (lower-cased, namespace stripped) by role, in the published corpus's two layouts.
_FOCUS = ("focus", "doctitle-focus")
_PAIR = ("qapair", "pair")
_DOCUMENT_CHILDREN = {*_FOCUS, "qapairs"}


@dataclass
class MedQuadRows:
    rows: list[dict[str, Any]] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)
    files: int = 0
    bad: Counter[str] = field(default_factory=Counter)  # files that could not be read, by reason
    first_bad: DatasetError | None = None


def is_medquad(path: Path) -> bool:
    """A .zip or .xml file, or a folder that holds .xml files (and no other data files)."""
    if path.is_file():
        return path.suffix.lower() in (".zip", ".xml")
    return path.is_dir() and next(path.rglob("*.xml"), None) is not None


def read_medquad(path: Path, *, skip_bad: bool = False) -> MedQuadRows:
    out = MedQuadRows()
    try:
        for name, data in _documents(path):
            out.files += 1
            try:
                if isinstance(data, DatasetError):
                    raise data
                _parse_document(name, data, out)
            except DatasetError as exc:
                if not skip_bad:
                    raise
                out.bad[f"medquad_file_{exc.code.removeprefix('dataset_')}"] += 1
                out.first_bad = out.first_bad or exc
    except OSError as exc:
        raise DatasetError(
            f"{path.name!r} cannot be read: {exc.strerror or type(exc).__name__}",
            field=FIELD,
            code="dataset_unreadable",
        ) from exc
    if out.files == 0:
        raise DatasetError(
            f"{path.name!r} holds no MedQuAD .xml documents",
            field=FIELD,
            code="dataset_empty",
        )
    return out


def _documents(path: Path) -> Iterator[tuple[str, bytes | DatasetError]]:
    """Each document's name and bytes, or the error that one member of a zip raised."""
    if path.is_dir():
        for file in sorted(path.rglob("*.xml")):
            yield str(file.relative_to(path)), file.read_bytes()
    elif path.suffix.lower() == ".zip":
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, UnicodeDecodeError, ValueError) as exc:
            # Damaged archives also fail on a member name flagged UTF-8 that is not.
            raise DatasetError(
                f"{path.name} is not a readable zip file: {exc}", field=FIELD, code="dataset_format"
            ) from exc
        with archive:
            names = sorted(
                n
                for n in archive.namelist()
                if n.lower().endswith(".xml") and not n.startswith("__MACOSX/")
            )
            for name in names:
                try:
                    yield name, _member(path, archive, name)
                except DatasetError as exc:
                    yield name, exc
    else:
        yield path.name, path.read_bytes()


def _member(path: Path, archive: zipfile.ZipFile, name: str) -> bytes:
    info = archive.getinfo(name)
    if info.file_size > MAX_DOCUMENT_BYTES:
        raise DatasetError(
            f"{path.name}: {name} would unpack to {info.file_size} bytes, more than a MedQuAD "
            f"document's limit of {MAX_DOCUMENT_BYTES}",
            field=FIELD,
            code="dataset_format",
        )
    try:
        return archive.read(name)
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        OSError,
        NotImplementedError,
        RuntimeError,
    ) as exc:
        # A truncated or corrupt member, an unsupported compression method, a password.
        raise DatasetError(
            f"{path.name}: {name} cannot be unpacked ({type(exc).__name__}: {str(exc)[:120]})",
            field=FIELD,
            code="dataset_format",
        ) from exc


def _declares_other_encoding(data: bytes) -> bool:
    head = data[:200].split(b"?>", 1)[0].lower()
    if not head.startswith(b"<?xml") or b"encoding" not in head:
        return False
    return b"utf-8" not in head and b"utf8" not in head


def _parse_document(name: str, data: bytes, out: MedQuadRows) -> None:
    if not data.strip():
        raise DatasetError(f"MedQuAD file {name} is empty", field=FIELD, code="dataset_empty")
    try:
        # Bytes, not text: the parser honours the document's own encoding declaration.
        root = ET.fromstring(data)
    except (LookupError, ValueError) as exc:
        # An encoding the declaration names but Python does not know (or expat cannot read).
        raise DatasetError(
            f"MedQuAD file {name} declares an encoding that cannot be read ({str(exc)[:80]}); "
            "re-save it as UTF-8",
            field=FIELD,
            code="dataset_encoding",
        ) from exc
    except ET.ParseError as exc:
        line, column = exc.position
        if not _declares_other_encoding(data):
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as decode_error:
                raise DatasetError(
                    f"MedQuAD file {name} is not UTF-8 text (byte {decode_error.start}) and "
                    "declares no other encoding; re-save it as UTF-8",
                    field=FIELD,
                    code="dataset_encoding",
                ) from exc
        raise DatasetError(
            f"MedQuAD file {name} is not well-formed XML (line {line}, column {column}): "
            f"{str(exc).split(':')[0]}",
            field=FIELD,
            code="dataset_format",
        ) from exc
    root_tag = root.tag
    for element in root.iter():
        if isinstance(element.tag, str):  # comments and processing instructions have none
            element.tag = element.tag.rsplit("}", 1)[-1].lower()
    if not {child.tag for child in root} & _DOCUMENT_CHILDREN:
        raise DatasetError(
            f"MedQuAD file {name}: the root element <{root_tag}> holds no <Focus> or <QAPairs>, "
            "so it is not a MedQuAD document",
            field=FIELD,
            code="dataset_format",
        )
    source = root.get("source") or root.get("corpus") or Path(name).parent.name or "medquad"
    focus = next(
        ((root.findtext(tag) or "").strip() for tag in _FOCUS if root.find(tag) is not None), ""
    )
    for pair in root.iter():
        if pair.tag not in _PAIR:
            continue
        question = pair.find("question")
        answer = pair.findtext("answer") or ""
        if question is None or not (question.text or "").strip():
            out.dropped["medquad_no_question"] += 1
            continue
        if not answer.strip():
            out.dropped["medquad_no_answer"] += 1
            continue
        out.rows.append(
            {
                "question": question.text,
                "answer": answer,
                "qtype": question.get("qtype") or "",
                "focus": focus,
                "source": source,
                "document": f"{name}#{pair.get('pid', '')}",
            }
        )
