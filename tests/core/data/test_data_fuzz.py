"""Property-based fuzzing of the dataset importers: a clean import or a stable error code.

Derandomized with the example database off, so every run tries the same cases in a few seconds;
bench/fuzz_importers.py runs the same generator for as long as you like.
"""

from __future__ import annotations

import io
import json
import random
import tempfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.data.mix import collect
from core.errors import DatasetError
from core.spec import DatasetSection
from tests.core.data.importer_cases import check_case, make_case


@settings(
    max_examples=400,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(rng=st.randoms(use_true_random=False))
def test_importers_import_or_raise_a_stable_code(rng: random.Random, data_roots: list[str]) -> None:
    # A fresh folder per example (tmp_path is one per test); inside the allowed dataset roots.
    with tempfile.TemporaryDirectory(dir=data_roots[0]) as folder:
        section, label = make_case(rng, Path(folder))
        result = check_case(section)
        assert result, label


# --- what the fuzzing found, pinned --------------------------------------------------------------

QA_CSV = "question,answer\nWhat is a fever?,A high temperature.\n"
DOC = (
    '<?xml version="1.0" encoding="UTF-8"?><Document id="1" source="T"><Focus>F</Focus><QAPairs>'
    '<QAPair pid="1"><Question qid="1-1" qtype="information">What is F?</Question>'
    "<Answer>F is a test.</Answer></QAPair></QAPairs></Document>"
)


def zipped(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return out.getvalue()


def corrupt_member() -> bytes:
    data = bytearray(zipped({"a.xml": DOC.encode() * 3}))
    start = data.index(b"a.xml") + len("a.xml") + 4  # inside the deflated bytes
    data[start : start + 6] = b"\xff" * 6
    return bytes(data)


def bad_member_name() -> bytes:
    data = bytearray(zipped({"ab.xml": DOC.encode()}))
    # Flag the names as UTF-8 (bit 11) and make one invalid UTF-8, in both headers.
    for header in (b"PK\x03\x04", b"PK\x01\x02"):
        at = data.index(header)
        flags = at + (6 if header == b"PK\x03\x04" else 8)
        data[flags + 1] |= 0x08
    name = data.index(b"ab.xml")
    data[name : name + 2] = b"\xc3\x28"
    second = data.index(b"ab.xml")
    data[second : second + 2] = b"\xc3\x28"
    return bytes(data)


@pytest.mark.parametrize(
    ("filename", "data", "expected"),
    [
        ("bom.csv", ("\ufeff" + QA_CSV).encode(), "ok"),  # Excel's UTF-8 with BOM
        ("utf16.csv", QA_CSV.encode("utf-16"), "ok"),
        ("utf16.jsonl", '{"question": "q?", "answer": "a."}\n'.encode("utf-16"), "ok"),
        ("utf16le.csv", QA_CSV.encode("utf-16-le"), "dataset_encoding"),
        ("latin1.csv", "question,answer\nqué?,sí.\n".encode("latin-1"), "dataset_encoding"),
        ("long.csv", f"question,answer\nq?,{'a' * 200_000}\n".encode(), "ok"),
        # Cells past the header's width no longer line up: the row is unreadable (all of them).
        ("wide.csv", b"question,answer\nq?,a.,extra,cells\n", "dataset_format"),
        ("deep.json", b"[" * 50_000 + b"]" * 50_000, "dataset_format"),
        ("deep.jsonl", b"[" * 50_000 + b"]" * 50_000, "dataset_format"),
        ("bigint.json", b'[{"question": 1' + b"0" * 5000 + b', "answer": 2}]', "dataset_format"),
        ("junk.jsonl", b'{"question": "q?", "answer": "a."}\nnot json\n', "dataset_bad_rows"),
        ("empty.jsonl", b"", "dataset_empty"),
        ("random.parquet", bytes(range(256)) * 4, "dataset_format"),
        ("member.zip", corrupt_member(), "dataset_format"),
        ("names.zip", bad_member_name(), "dataset_format"),
        ("truncated.zip", zipped({"a.xml": DOC.encode()})[:60], "dataset_format"),
        ("klingon.xml", b'<?xml version="1.0" encoding="klingon"?><Document/>', "dataset_encoding"),
        ("utf16.xml", DOC.replace("UTF-8", "UTF-16").encode("utf-16"), "ok"),
        ("broken.xml", DOC.encode()[:-30], "dataset_format"),
    ],
)
def test_damaged_files_found_by_fuzzing(
    tmp_path: Path, filename: str, data: bytes, expected: str
) -> None:
    path = tmp_path / filename
    path.write_bytes(data)
    assert check_case(DatasetSection(name=str(path))) == expected


def test_parquet_errors_name_the_file_not_the_server_folder(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError) as info:
        collect(DatasetSection(name=str(path)))
    assert "bad.parquet" in info.value.detail and str(tmp_path) not in info.value.detail


def test_messages_rows_that_are_not_lists_or_have_unknown_roles_are_dropped(
    tmp_path: Path,
) -> None:
    good = [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "a."}]
    tool = [*good[:1], {"role": "tool", "content": "{}"}, good[1]]
    rows = [{"messages": good}, {"messages": 7}, {"messages": "text"}, {"messages": tool}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    collected = collect(DatasetSection(name=str(path)))
    assert len(collected.examples) == 1
    assert collected.dropped == {"no_final_assistant_turn": 2, "unknown_role": 1}
