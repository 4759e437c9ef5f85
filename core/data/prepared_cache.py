"""Prepared datasets kept by content, so a job on data prepared before skips the data stage.

An entry is addressed by a SHA-256 of everything preparation reads: the bytes of every local
source file (a folder: every file in it, by relative path), the tokenizer's content (vocabulary,
merges, normaliser, special tokens, chat template), every field of the job's training_dataset
and validation_dataset, max_seq_length, and the code of ``core/data`` with the transformers and
tokenizers versions. Change any of them and the key changes; nothing is ever stale. Hub
datasets are not cached (a Hub dataset without a pinned commit can change under the same name).

Entries are JSON files under ``$MEDTUNE_HOME/cache/prepared/``, shared by the jobs that prepare
the same data. They hold medical text, so each job records the key it used in its folder
(``prepared-data.key``) and deleting the job (``DELETE /jobs/{id}``, retention) deletes the
entry with it; a later job on the same data prepares it again. The folder is bounded by
``MEDTUNE_PREPARED_CACHE_BYTES`` (least recently used entries go first; 0 turns the cache off).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from core.data.example import Example
from core.data.prepare import Prepared
from core.data.tokenize import Encoded
from core.spec import DatasetSection, JobSpec

log = logging.getLogger(__name__)

FORMAT = 1
JOB_KEY_FILE = "prepared-data.key"  # in the job's folder: the entry it used


@lru_cache(maxsize=1)
def code_identity() -> str:
    """The data-preparation code and the tokenization libraries it runs on."""
    import importlib.metadata

    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for package in ("transformers", "tokenizers"):
        try:
            digest.update(f"{package}={importlib.metadata.version(package)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{package}=none".encode())
    return digest.hexdigest()


def tokenizer_identity(tokenizer: Any) -> str:
    """A hash of what the tokenizer does, wherever it was loaded from."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    settings = {
        k: repr(v)
        for k, v in sorted(getattr(tokenizer, "init_kwargs", {}).items())
        if not k.endswith("_file") and k not in ("name_or_path", "_commit_hash")
    }
    extra = {
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {k: repr(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "settings": settings,
        "padding_side": getattr(tokenizer, "padding_side", None),
    }
    digest.update(json.dumps(extra, sort_keys=True, default=repr).encode())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_identity(section: DatasetSection) -> str | None:
    """The content of one source's file or folder; None for a Hub dataset (not cached)."""
    from core.data.sources import resolve_local

    path = resolve_local(section)
    if path is None:
        return None
    if path.is_file():
        return _file_digest(path)
    digest = hashlib.sha256()
    for entry in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(entry.relative_to(path)).encode() + b"\0")
        digest.update(_file_digest(entry).encode())
    return digest.hexdigest()


def _single_sources(section: DatasetSection) -> list[DatasetSection]:
    from core.data.sources import source_section

    if section.sources is None:
        return [section]
    return [source_section(section, i) for i in range(len(section.sources))]


def cache_key(spec: JobSpec, tokenizer: Any) -> str | None:
    """The entry a job's data would have; None when it cannot be cached (a Hub source) or a
    source cannot be read (preparation then raises the error the user should see)."""
    from core.data.validation import validation_section
    from core.errors import MedtuneError

    sections = _single_sources(spec.dataset)
    if spec.validation_dataset is not None:
        sections += _single_sources(validation_section(spec.dataset, spec.validation_dataset))
    try:
        sources = [source_identity(s) for s in sections]
    except (MedtuneError, OSError):
        return None
    if any(s is None for s in sources):
        return None
    parts = {
        "format": FORMAT,
        "code": code_identity(),
        "tokenizer": tokenizer_identity(tokenizer),
        "dataset": spec.dataset.model_dump(mode="json"),
        "validation": spec.validation_dataset.model_dump(mode="json")
        if spec.validation_dataset
        else None,
        "max_seq_length": spec.model.max_seq_length,
        "sources": sources,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _entry(folder: Path, key: str) -> Path:
    return folder / f"{key}.json"


def _item(item: Encoded, example: Example | None) -> dict[str, Any]:
    return {
        "input_ids": item.input_ids,
        "labels": item.labels,
        "truncated": item.truncated,
        "length": item.length,
        "answer_spans": item.answer_spans,
        # Uncut ids equal the cut ones unless the example was truncated: stored once.
        "full_ids": None if item.full_ids == item.input_ids else item.full_ids,
        "full_labels": None if item.full_labels == item.labels else item.full_labels,
        "meta": "example" if example is not None and item.meta is example.meta else item.meta,
    }


def _unitem(data: dict[str, Any], example: Example | None) -> Encoded:
    meta = data["meta"]
    return Encoded(
        input_ids=data["input_ids"],
        labels=data["labels"],
        truncated=data["truncated"],
        length=data["length"],
        answer_spans=[tuple(span) for span in data["answer_spans"]],  # type: ignore[misc]
        full_ids=list(data["input_ids"]) if data["full_ids"] is None else data["full_ids"],
        full_labels=list(data["labels"]) if data["full_labels"] is None else data["full_labels"],
        meta=example.meta if meta == "example" and example is not None else meta,
    )


def _examples(examples: list[Example]) -> list[dict[str, Any]]:
    return [{"messages": e.messages, "text": e.text, "meta": e.meta} for e in examples]


def _pairs(items: list[Any], examples: list[Any]) -> list[tuple[Any, Any]]:
    # examples run parallel to items; where they do not (none kept), items stand alone.
    if len(examples) == len(items):
        return list(zip(items, examples, strict=True))
    return [(item, None) for item in items]


def dump(prepared: Prepared) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "examples": _examples(prepared.examples),
        "validation_examples": _examples(prepared.validation_examples),
        "train": [_item(i, e) for i, e in _pairs(prepared.train, prepared.examples)],
        "validation": [
            _item(i, e) for i, e in _pairs(prepared.validation, prepared.validation_examples)
        ],
        "stats": prepared.stats,
    }


def undump(data: dict[str, Any]) -> Prepared:
    examples = [Example(**e) for e in data["examples"]]
    held = [Example(**e) for e in data["validation_examples"]]
    return Prepared(
        train=[_unitem(i, e) for i, e in _pairs(data["train"], examples)],
        validation=[_unitem(i, e) for i, e in _pairs(data["validation"], held)],
        examples=examples,
        validation_examples=held,
        stats=data["stats"],
    )


def read(folder: Path, key: str) -> Prepared | None:
    """The entry, or None (missing, or unreadable: it is then removed)."""
    path = _entry(folder, key)
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')}")
        prepared = undump(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("prepared-data cache entry %s unreadable (%s): removed", key[:12], exc)
        path.unlink(missing_ok=True)
        return None
    with contextlib.suppress(OSError):  # evicted or deleted meanwhile: the data is read
        os.utime(path)  # most recently used: evicted last
    return prepared


def write(folder: Path, key: str, prepared: Prepared, *, cap_bytes: int) -> bool:
    """Store an entry (atomically), then evict the least recently used ones over ``cap_bytes``.
    False when the data cannot be stored as JSON, or the cache folder cannot be written (a full
    or read-only volume): the job goes on with the data it prepared, which is prepared again
    next time."""
    path = _entry(folder, key)
    try:
        text = json.dumps(dump(prepared))
    except (TypeError, ValueError) as exc:  # e.g. a metadata column of an unusual type
        log.info("prepared data not cached: %s", exc)
        return False
    if len(text) > cap_bytes:
        return False
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("prepared data not cached: %s", exc)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return False
    evict(folder, cap_bytes=cap_bytes)
    return True


def evict(folder: Path, *, cap_bytes: int) -> list[Path]:
    """Remove the least recently used entries until the folder holds at most ``cap_bytes``."""
    entries = []
    for path in folder.glob("*.json"):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        entries.append((stat.st_mtime, stat.st_size, path))
    entries.sort()
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, path in entries:
        if total <= cap_bytes:
            break
        path.unlink(missing_ok=True)
        total -= size
        removed.append(path)
    return removed


def record_for_job(job_dir: Path, key: str) -> None:
    """Name the entry in the job's folder, so deleting the job deletes the entry."""
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / JOB_KEY_FILE).write_text(key + "\n")


def forget_for_jobs(job_dirs: list[Path], folder: Path) -> list[Path]:
    """Delete the entries the jobs in ``job_dirs`` recorded, and any half-written copy of them
    a worker killed while writing left (``<key>.json.<pid>.tmp``); returns the files removed."""
    removed = []
    for job_dir in job_dirs:
        try:
            key = (job_dir / JOB_KEY_FILE).read_text().strip()
        except OSError:
            continue
        if len(key) == 64 and all(c in "0123456789abcdef" for c in key):
            entry = _entry(folder, key)
            for path in [entry, *folder.glob(f"{entry.name}.*.tmp")]:
                if path.exists():
                    path.unlink(missing_ok=True)
                    removed.append(path)
    return removed
