"""Random dataset files for fuzzing the importers, built from one ``random.Random``.

A case starts from a well-formed file of a random layout (JSONL, JSON, CSV, Parquet, MedQuAD XML,
a zip or a folder of it) with random rows, then may be damaged: cut short, bytes flipped, junk
lines, another encoding (latin-1, UTF-16 with or without a byte-order mark), emptied, one huge
line, or replaced by random bytes. The property: reading it either works or raises a
MedtuneError with one of ``STABLE_CODES``. Hypothesis drives the Random in
tests/core/data/test_data_fuzz.py (so failures shrink); bench/fuzz_importers.py runs it for longer.
"""

from __future__ import annotations

import io
import json
import random
import zipfile
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from core.data.mix import collect
from core.errors import MedtuneError
from core.spec import DatasetSection

STABLE_CODES = frozenset(
    {
        "dataset_format",
        "dataset_encoding",
        "dataset_empty",
        "dataset_columns",
        "dataset_unreadable",
        "dataset_bad_rows",
    }
)
KINDS = ("jsonl", "json", "csv", "parquet", "xml", "zip", "folder")
KEYS = ("question", "answer", "instruction", "input", "output", "prompt", "system", "q", "a")
TEXTS = (
    "What is a fever?",
    "A body temperature above 38 °C.",
    "",
    "   ",
    "nan",
    "Tom &amp;amp; Jerry&#39;s &lt;b&gt;rash&lt;/b&gt;",
    "línea\r\nnueva\ttab",
    "日本語の質問",
    "emoji 🩺 and \u200b zero width",
    '"quoted", with, commas',
    "<tag>&</tag>",
    "\\x00 escaped",
)
MUTATIONS = (
    "none",
    "none",
    "truncate",
    "flip",
    "junk_line",
    "latin1",
    "utf16_bom",
    "utf16_no_bom",
    "utf8_bom",
    "empty",
    "huge_line",
    "binary",
)


def _text(rng: random.Random) -> str:
    if rng.random() < 0.1:
        return "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(1, 40)))
    return rng.choice(TEXTS)


def _value(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.75:
        return _text(rng)
    return rng.choice([None, 42, 3.5, float("nan"), True, ["a", "b"], {"k": "v"}])


def _messages(rng: random.Random) -> Any:
    if rng.random() < 0.15:
        return rng.choice(["not a list", 7, None, [1, 2], [{"role": "user"}]])
    roles = ["system", "user", "assistant", "user", "assistant", "tool", "", "bot"]
    count = rng.randint(0, 5)
    return [
        {
            "role": rng.choice(roles[:5]) if rng.random() < 0.9 else rng.choice(roles),
            "content": _value(rng),
        }
        for _ in range(count)
    ]


def random_rows(rng: random.Random) -> list[dict[str, Any]]:
    layout = rng.choice(["qa", "alpaca", "messages", "prompt", "junk"])
    keys = {
        "qa": ["question", "answer"],
        "alpaca": ["instruction", "input", "output"],
        "messages": ["messages"],
        "prompt": ["prompt"],
        "junk": rng.sample(KEYS, rng.randint(0, 3)),
    }[layout]
    rows = []
    for _ in range(rng.randint(0, 6)):
        row = {k: (_messages(rng) if k == "messages" else _value(rng)) for k in keys}
        if rng.random() < 0.15 and row:
            row.pop(rng.choice(list(row)))  # a row missing a column
        if rng.random() < 0.1:
            row[rng.choice(KEYS)] = _value(rng)
        rows.append(row)
    return rows


def _flat(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _csv(rows: list[dict[str, Any]], rng: random.Random) -> bytes:
    import csv

    header = sorted({k for r in rows for k in r}) or rng.sample(KEYS, 2)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for row in rows:
        cells = [_flat(row.get(k, "")) for k in header]
        if rng.random() < 0.1:  # a short row, or one wider than the header
            cells = rng.choice([cells[: rng.randint(0, len(cells))], [*cells, "extra", "cell"]])
        writer.writerow(cells)
    return out.getvalue().encode("utf-8")


def _parquet(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    header = sorted({k for r in rows for k in r}) or ["question"]
    table = pa.table({k: [_flat(r[k]) if k in r else None for r in rows] for k in header})
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


def _medquad(rows: list[dict[str, Any]], rng: random.Random) -> bytes:
    lower = rng.random() < 0.2  # the NINDS variant of the layout
    doc, pair, q, a, focus = (
        ("doc", "pair", "question", "answer", "doctitle-focus")
        if lower
        else ("Document", "QAPair", "Question", "Answer", "Focus")
    )
    pairs = "".join(
        f'<{pair} pid="{i}"><{q} qid="1-{i}" qtype="information">'
        f"{escape(_flat(r.get('question', '')))}</{q}>"
        f"<{a}>{escape(_flat(r.get('answer', '')))}</{a}></{pair}>"
        for i, r in enumerate(rows)
    )
    if rng.random() < 0.1:
        pairs += "<Unclosed>"
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{doc} id="1" source="FUZZ">'
        f"<{focus}>{escape(_text(rng))}</{focus}><QAPairs>{pairs}</QAPairs></{doc}>"
    ).encode()


def encode(kind: str, rows: list[dict[str, Any]], rng: random.Random) -> bytes:
    if kind == "jsonl":
        return "\n".join(json.dumps(r, ensure_ascii=rng.random() < 0.5) for r in rows).encode()
    if kind == "json":
        return json.dumps({"data": rows} if rng.random() < 0.3 else rows).encode()
    if kind == "csv":
        return _csv(rows, rng)
    if kind == "parquet":
        return _parquet(rows)
    return _medquad(rows, rng)


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    how = rng.choice(MUTATIONS)
    if how == "truncate" and data:
        data = data[: rng.randrange(len(data))]
    elif how == "flip" and data:
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        data = bytes(flipped)
    elif how == "junk_line":
        lines = data.split(b"\n")
        lines.insert(
            rng.randint(0, len(lines)), rng.choice([b"not json", b"{", b"]]", b"\xff\xfe"])
        )
        data = b"\n".join(lines)
    elif how in ("latin1", "utf16_bom", "utf16_no_bom", "utf8_bom"):
        text = data.decode("utf-8", errors="replace")
        codec = {
            "latin1": "latin-1",
            "utf16_bom": "utf-16",
            "utf16_no_bom": rng.choice(["utf-16-le", "utf-16-be"]),
            "utf8_bom": "utf-8-sig",
        }[how]
        data = text.encode(codec, errors="replace")
    elif how == "empty":
        data = rng.choice([b"", b"\n\n", b"   "])
    elif how == "huge_line":
        data = (
            data
            + b"\n"
            + rng.choice([b"x", b"[", b'{"question": "']) * rng.randint(140_000, 300_000)
        )
    elif how == "binary":
        data = rng.randbytes(rng.randint(1, 2048))
    return data, how


def _zip(docs: list[bytes], rng: random.Random) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])) as z:
        for i, doc in enumerate(docs):
            z.writestr(f"{i}_FUZZ/doc{i}.xml", doc)
    return out.getvalue()


def make_case(rng: random.Random, folder: Path) -> tuple[DatasetSection, str]:
    """Write one random (maybe damaged) dataset under ``folder``; return its section and label."""
    kind = rng.choice(KINDS)
    label = kind
    if kind in ("zip", "folder"):
        docs = []
        for _ in range(rng.randint(0, 3)):
            doc, how = (
                mutate(_medquad(random_rows(rng), rng), rng)
                if rng.random() < 0.5
                else (
                    _medquad(random_rows(rng), rng),
                    "none",
                )
            )
            docs.append(doc)
            label += f"+{how}"
        if kind == "zip":
            data, how = (
                mutate(_zip(docs, rng), rng) if rng.random() < 0.5 else (_zip(docs, rng), "none")
            )
            label += f"/{how}"
            path = folder / "data.zip"
            path.write_bytes(data)
        else:
            path = folder / "medquad"
            path.mkdir()
            for i, doc in enumerate(docs):
                (path / f"doc{i}.xml").write_bytes(doc)
    else:
        data, how = mutate(encode(kind, random_rows(rng), rng), rng)
        label += f"/{how}"
        path = folder / f"data.{kind}"
        path.write_bytes(data)
    options: dict[str, Any] = {}
    roll = rng.random()
    if roll < 0.15:
        options["columns"] = {"question": rng.choice(KEYS), "answer": rng.choice(KEYS)}
    elif roll < 0.2:
        options["columns"] = {"messages": rng.choice(["messages", "q"])}
    elif roll < 0.25:
        options["rename_columns"] = {rng.choice(KEYS): "question"}
    elif roll < 0.3:
        options["remove_columns"] = [rng.choice(KEYS)]
    if rng.random() < 0.1:
        options["format"] = rng.choice(["medquad", "records"])
    if rng.random() < 0.1:
        options["max_samples"] = rng.randint(1, 3)
    name = str(path) + ("/" if path.is_dir() else "")
    return DatasetSection(name=name, **options), label


def check_case(section: DatasetSection) -> str:
    """Read the case; return "ok" or the error code. Anything but a MedtuneError escapes."""
    try:
        collected = collect(section)
    except MedtuneError as exc:
        assert exc.code in STABLE_CODES, (exc.code, exc.detail)
        assert exc.field and exc.field.startswith("training_dataset"), exc.field
        assert exc.detail and "Traceback" not in exc.detail
        return exc.code
    assert collected.examples, "an import that works gives examples"
    for example in collected.examples:
        if example.messages is not None:
            assert example.messages[-1]["role"] == "assistant" and example.messages[-1]["content"]
            assert all(isinstance(m["content"], str) for m in example.messages)
    return "ok"
