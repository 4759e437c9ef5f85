"""Where rows come from: the shipped sample, local files, or the Hugging Face Hub.

This module imports no torch and no tokenizer, so the API can validate a spec's dataset cheaply.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from core.data.bad_rows import BadRow, check_bad_share, good_rows
from core.data.medquad import is_medquad, read_medquad
from core.errors import DatasetError, DatasetNotFound, HubUnavailable, MedtuneError, SpecError
from core.hub_errors import hub_error
from core.paths import is_inside, link_leads_out, real_path
from core.settings import Settings, get_settings
from core.spec import DATA_SUFFIXES, SOURCE_FIELDS, DatasetSection
from core.store import files

# Plain text: one document per file, read for format "text" (and a .txt file under "auto").
TEXT_SUFFIX = ".txt"

SAMPLES = {
    "medical_qa": "medical_qa_sample.jsonl",
    "medical_preference": "medical_preference_sample.jsonl",  # dpo / orpo pairs
}
FIELD = "training_dataset"
CSV_FIELD_LIMIT = 64 * 2**20  # characters in one CSV cell
_EXTRA_CELLS = "_extra_cells"  # DictReader's key for cells past the header's width
Row = dict[str, Any]


def sample_path(name: str) -> Path:
    key = name.removeprefix("sample:")
    if key not in SAMPLES:
        raise DatasetNotFound(
            f"unknown sample {name!r}; shipped samples: "
            + ", ".join(f"sample:{k}" for k in SAMPLES),
            field="training_dataset.name",
        )
    return Path(str(resources.files("core") / "samples" / SAMPLES[key]))


class DatasetPathNotAllowed(SpecError):
    code = "dataset_path_not_allowed"


def allowed_roots(settings: Settings | None = None) -> list[Path]:
    """Folders a dataset path may point into: the samples, $MEDTUNE_HOME/data, data_roots."""
    settings = settings or get_settings()
    samples = Path(str(resources.files("core") / "samples"))
    return [p.expanduser().resolve() for p in (samples, settings.data_dir, *settings.data_roots)]


def _not_allowed(section: DatasetSection, what: str) -> DatasetPathNotAllowed:
    # Names only what the client sent: the server's folders are not the client's business.
    return DatasetPathNotAllowed(
        f"dataset path {section.name!r} {what}; this server reads datasets only from its "
        "shipped samples, $MEDTUNE_HOME/data and the folders in MEDTUNE_DATA_ROOTS: copy the "
        "file there, or ask the operator to add its folder",
        field="training_dataset.name",
    )


def resolve_local(
    section: DatasetSection,
    *,
    roots: Sequence[Path] | None = None,
    uploads: Path | None = None,
) -> Path | None:
    """The file or folder a spec points at, checked to exist; None for Hub datasets.

    An uploaded file (``file-...``) is found by its id under ``uploads`` (default: the
    settings' uploads_dir); who may use it is the API's check (core.store.files). A path may not
    lead into the uploads folder: uploaded files are named by id, so ownership holds.

    A local path must lead inside ``roots`` (default: :func:`allowed_roots` of the settings)
    once ``..`` and links are resolved, and a folder must hold no link leading outside them.
    The API checks at submit time and the worker again before it reads. A mix has no one
    path: each of its sources is checked, and None is returned.
    """
    if section.sources is not None:
        for index in range(len(section.sources)):
            with scoped(section, index):
                resolve_local(source_section(section, index), roots=roots, uploads=uploads)
        return None
    if section.kind == "sample":
        return sample_path(section.name)
    if section.kind == "hub":
        return None
    roots = allowed_roots() if roots is None else roots
    uploads = (uploads or get_settings().uploads_dir).expanduser().resolve()
    if section.kind == "file":
        stored = files.resolve(section.name, uploads).resolve()
        if not (is_inside(stored, [uploads]) and is_inside(stored, roots)):
            raise _not_allowed(section, "leads outside the uploads folder")
        return stored
    real = real_path(Path(section.name))
    # Where the path really leads is checked before whether it exists, so that a path outside
    # the roots tells nothing of what exists there.
    if real is not None and not is_inside(real, roots):
        raise _not_allowed(section, "is outside the folders datasets may come from")
    if real is not None and (is_inside(real, [uploads]) or is_inside(uploads, [real])):
        raise _not_allowed(section, "leads into the uploaded files; name an upload by its id")
    if real is None or not real.exists():
        raise DatasetNotFound(
            f"dataset path {section.name!r} does not exist on the server; upload the file or give "
            "a path the worker can read",
            field="training_dataset.name",
        )
    if real.is_dir() and link_leads_out(real, roots, into=[uploads]):
        raise _not_allowed(section, "holds a link leading outside those folders")
    return real


@dataclass
class Loaded:
    """Rows as read (after the rename/remove/column steps), and what was skipped while reading."""

    rows: list[Row]
    format: str
    dropped: Counter[str] = field(default_factory=Counter)


def source_section(section: DatasetSection, index: int) -> DatasetSection:
    """Source ``index`` of a mix as a single-source section (the mix's other settings kept)."""
    assert section.sources is not None
    source = section.sources[index]
    update = {name: getattr(source, name) for name in SOURCE_FIELDS}
    return section.model_copy(
        update={**update, "sources": None, "mix_size": None, "mix_oversample": False}
    )


@contextmanager
def scoped(section: DatasetSection, index: int) -> Iterator[None]:
    """Name source ``index`` in errors raised while reading it: training_dataset.name becomes
    training_dataset.sources[<index>].name, and the message says which source it was."""
    try:
        yield
    except MedtuneError as exc:
        assert section.sources is not None
        prefix = f"{FIELD}."
        if exc.field == FIELD:
            exc.field = f"{FIELD}.sources[{index}]"
        elif exc.field and exc.field.startswith(prefix):
            rest = exc.field.removeprefix(prefix)
            if rest.split(".", 1)[0] in SOURCE_FIELDS:
                exc.field = f"{FIELD}.sources[{index}].{rest}"
        exc.detail = f"source {index} ({section.sources[index].name!r}): {exc.detail}"
        exc.args = (exc.detail,)
        raise


def load(section: DatasetSection) -> Loaded:
    if section.sources is not None:
        raise ValueError("load() reads one source; core.data.mix.collect reads a mix")
    path = resolve_local(section)
    dropped: Counter[str] = Counter()
    fmt = "records"
    if (
        path is not None
        and section.format not in ("records", "text")
        and (section.format == "medquad" or is_medquad(path))
    ):
        medquad = read_medquad(path, skip_bad=section.on_bad_rows == "skip")
        check_bad_share(
            medquad.bad,
            good=medquad.files - sum(medquad.bad.values()),
            first=medquad.first_bad,
            section=section,
            unit="MedQuAD files",
        )
        rows, dropped, fmt = medquad.rows, medquad.dropped + medquad.bad, "medquad"
    elif path is not None:
        text = section.format == "text" or (section.format == "auto" and _is_txt(path))
        rows, dropped, first = good_rows(_read_path(path, text=text), section)
        check_bad_share(dropped, good=len(rows), first=first, section=section)
        fmt = "text" if text else fmt
    else:
        rows = _read_hub(section)
    if section.format == "text":
        fmt = "text"
    if section.max_samples is not None:
        rows = rows[: section.max_samples]
    if not rows:
        raise DatasetError(
            f"dataset {section.name!r} has no rows" + (f" ({dict(dropped)})" if dropped else ""),
            field="training_dataset.name",
            code="dataset_empty",
        )
    return Loaded(rows=map_columns(rows, section), format=fmt, dropped=dropped)


def load_rows(section: DatasetSection) -> list[Row]:
    return load(section).rows


def map_columns(rows: list[Row], section: DatasetSection) -> list[Row]:
    """The recipe's rename and remove steps, then the explicit column mapping, if any."""
    if not (section.rename_columns or section.remove_columns or section.columns):
        return rows
    columns = set().union(*(r.keys() for r in rows[:100]))
    for old, where in [(c, "rename_columns") for c in section.rename_columns] + [
        (c, "remove_columns") for c in section.remove_columns
    ]:
        if old not in columns:
            raise _missing_column(old, f"training_dataset.{where}", columns)
    rename, remove = section.rename_columns, set(section.remove_columns)
    if rename or remove:
        rows = [{rename.get(k, k): v for k, v in r.items() if k not in remove} for r in rows]
        columns = {rename.get(c, c) for c in columns if c not in remove}
    mapping = section.columns
    if mapping is None:
        return rows
    wanted = {
        key: column
        for key, column in (
            ("question", mapping.question),
            ("answer", mapping.answer),
            ("system", mapping.system),
            ("messages", mapping.messages),
        )
        if column is not None
    }
    for key, column in wanted.items():
        if column not in columns:
            raise _missing_column(column, f"training_dataset.columns.{key}", columns)
    keep = ("qtype", "focus", "source", "document")
    mapped = []
    for row in rows:
        out = {key: row.get(column) for key, column in wanted.items()}
        if isinstance(out.get("messages"), str):
            out["messages"] = _parse_messages(out["messages"])
        out.update({k: row[k] for k in keep if k in row and k not in wanted})
        mapped.append(out)
    return mapped


def _parse_messages(value: str) -> Any:
    # CSV cells hold the messages list as JSON text.
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return None


def _missing_column(column: str, where: str, columns: set[str]) -> DatasetError:
    return DatasetError(
        f"{where} names column {column!r}, which the dataset does not have; its columns are "
        f"{sorted(columns)[:20]}",
        field=where,
        code="dataset_columns",
    )


def _read_path(path: Path, *, text: bool = False) -> Iterator[Row | BadRow]:
    """Rows of a file or of a folder's data files; ``text`` (format "text") reads .txt files
    too, each one document (elsewhere a folder's README.txt is not data)."""
    suffixes = DATA_SUFFIXES + ((TEXT_SUFFIX,) if text else ())
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes)
        if not files:
            raise DatasetError(
                f"folder {path.name!r} holds no {', '.join(suffixes)} files",
                field="training_dataset.name",
                code="dataset_empty",
            )
        for file in files:
            yield from _read_file(file, text=text)
    else:
        yield from _read_file(path, text=text)


def _bad(path: Path, what: str, code: str = "dataset_format") -> DatasetError:
    return DatasetError(f"{path.name} {what}", field="training_dataset.name", code=code)


def _encoding(path: Path) -> str:
    """UTF-8, with or without a byte-order mark (Excel writes one); UTF-16 when a BOM says so."""
    with path.open("rb") as fh:
        head = fh.read(4)
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return "utf-8"


def _text_lines(path: Path, fh: Iterator[str]) -> Iterator[str]:
    # UTF-16 without a BOM decodes as "UTF-8" full of NULs: name the real problem.
    for lineno, line in enumerate(fh, 1):
        if "\x00" in line:
            raise _bad(
                path,
                f"line {lineno} holds NUL characters: UTF-16 without a byte-order mark, or not "
                "text at all; re-save it as UTF-8",
                "dataset_encoding",
            )
        yield line


def _read_file(path: Path, *, text: bool = False) -> Iterator[Row | BadRow]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            yield from _read_jsonl(path)
        elif suffix == ".json":
            yield from _read_json(path)
        elif suffix == ".csv":
            yield from _read_csv(path)
        elif suffix == ".parquet":
            yield from _read_parquet(path)
        elif suffix == TEXT_SUFFIX and text:
            yield _read_txt(path)
        else:
            raise _bad(path, f"is of an unsupported file type; use {', '.join(DATA_SUFFIXES)}")
    except UnicodeError as exc:
        start = getattr(exc, "start", None)
        where = f" (byte {start})" if start is not None else ""
        raise _bad(
            path, f"is not UTF-8 text{where}; re-save it as UTF-8", "dataset_encoding"
        ) from exc
    except OSError as exc:
        raise _bad(
            path, f"cannot be read: {exc.strerror or type(exc).__name__}", "dataset_unreadable"
        ) from exc


def _parse_json(path: Path, text: str, where: str = "") -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        line = f" at line {exc.lineno}" if not where else ""
        raise _bad(path, f"{where}is not valid JSON: {exc.msg}{line}") from exc
    except (ValueError, RecursionError) as exc:
        # Integers past Python's digit limit, arrays nested thousands deep.
        raise _bad(path, f"{where}is not JSON medtune can read: {str(exc)[:120]}") from exc


def _is_txt(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == TEXT_SUFFIX


def _read_txt(path: Path) -> Row:
    """A plain-text file is one document (a long one is split into windows when tokenized)."""
    with path.open(encoding=_encoding(path)) as fh:
        return {"text": "".join(_text_lines(path, fh)), "document": path.name}


def _read_json(path: Path) -> Iterator[Row | BadRow]:
    with path.open(encoding=_encoding(path)) as fh:
        raw = "".join(_text_lines(path, fh))
    if not raw.strip():
        raise _bad(path, "is empty", "dataset_empty")
    data = _parse_json(path, raw)
    rows = data.get("data") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise _bad(path, "holds no JSON list of objects (or {'data': [...]})")
    for index, row in enumerate(rows):
        if isinstance(row, dict):
            yield row
        else:
            yield BadRow("bad_row_not_an_object", _bad(path, f"item {index} is not a JSON object"))


def _read_csv(path: Path) -> Iterator[Row | BadRow]:
    # Long answers exceed the csv module's default 128 KiB field limit.
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    with path.open(encoding=_encoding(path), newline="") as fh:
        reader = csv.DictReader(_text_lines(path, fh), restkey=_EXTRA_CELLS)
        try:
            for row in reader:
                # More cells than the header (an unquoted comma) or fewer (a cut line): the
                # cells no longer line up with their columns, so no cell of the row is trusted.
                if _EXTRA_CELLS in row or None in row.values():
                    width = len(reader.fieldnames or ())
                    cells = width + len(row.get(_EXTRA_CELLS, ())) - list(row.values()).count(None)
                    yield BadRow(
                        "bad_row_cell_count",
                        _bad(
                            path,
                            f"line {reader.line_num} has {cells} cells where the header has "
                            f"{width}; quote cells that hold commas",
                        ),
                    )
                else:
                    yield row
        except csv.Error as exc:
            raise _bad(
                path, f"is not a CSV file medtune can read (line {reader.line_num}): {exc}"
            ) from exc


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        # Arrow's message names the server path: the client sent only the name.
        message = str(exc).replace(str(path), path.name)[:200]
        raise _bad(path, f"is not a readable Parquet file: {message}") from exc
    yield from table.to_pylist()


def _read_jsonl(path: Path) -> Iterator[Row | BadRow]:
    with path.open(encoding=_encoding(path)) as fh:
        for lineno, line in enumerate(_text_lines(path, fh), 1):
            if not line.strip():
                continue
            try:
                row = _parse_json(path, line, f"line {lineno} ")
            except DatasetError as exc:
                yield BadRow("bad_row_invalid_json", exc)
                continue
            if isinstance(row, dict):
                yield row
            else:
                yield BadRow(
                    "bad_row_not_an_object", _bad(path, f"line {lineno} is not a JSON object")
                )


def _read_hub(section: DatasetSection) -> list[Row]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a core dependency
        raise HubUnavailable("the 'datasets' package is not installed") from exc
    try:
        loaded = datasets.load_dataset(section.name, split=section.split, revision=section.revision)
    except Exception as exc:
        # The Hub raises many types (connection, offline mode, gated repo): one code per cause.
        raise hub_error(
            exc,
            what=f"dataset (split {section.split!r})",
            name=section.name,
            revision=section.revision,
            field="training_dataset.name",
            revision_field="training_dataset.revision",
            instead="use a local file, an uploaded file or 'sample:medical_qa'",
        ) from exc
    return [dict(r) for r in loaded]
