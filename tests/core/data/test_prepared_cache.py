"""Prepared datasets kept by content (issue 13): an entry gives back exactly what preparing gave;
its key changes with the file bytes, the tokenizer and every preparation setting; Hub data is
not cached; the folder keeps to its size; deleting a job deletes the entry it used."""

from __future__ import annotations

import copy
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from core.data import prepared_cache
from core.data.prepare import Prepared, prepare
from core.data.sources import sample_path
from core.spec import JobSpec


def _spec(data: Path, **dataset: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model_config": {"base_model": "smollm2-135m-instruct", "max_seq_length": 256},
            "training_dataset": {
                "name": str(data),
                "system_prompt": "Be brief.",
                "validation_share": 0.25,
                **dataset,
            },
        }
    )


def _data(tmp_path: Path) -> Path:
    target = tmp_path / "qa" / sample_path("sample:medical_qa").name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(sample_path("sample:medical_qa"), target)
    return target


def _prepared(spec: JobSpec, tokenizer: Any) -> Prepared:
    return prepare(
        spec.dataset,
        copy.deepcopy(tokenizer),
        max_seq_length=spec.model.max_seq_length,
        validation=spec.validation_dataset,
    )


def test_an_entry_gives_back_what_preparing_gave(tmp_path: Path, tokenizer: Any) -> None:
    spec = _spec(_data(tmp_path))
    prepared = _prepared(spec, tokenizer)
    assert prepared.validation and any(i.truncated for i in prepared.train) is False
    key = prepared_cache.cache_key(spec, tokenizer)
    assert key is not None and len(key) == 64
    folder = tmp_path / "cache"
    assert prepared_cache.read(folder, key) is None
    assert prepared_cache.write(folder, key, prepared, cap_bytes=1 << 30)
    back = prepared_cache.read(folder, key)
    assert back is not None
    assert [asdict(i) for i in back.train] == [asdict(i) for i in prepared.train]
    assert [asdict(i) for i in back.validation] == [asdict(i) for i in prepared.validation]
    assert back.examples == prepared.examples
    assert back.validation_examples == prepared.validation_examples
    assert back.stats == prepared.stats
    # Items share their example's metadata, as prepare hands them over.
    assert all(i.meta is e.meta for i, e in zip(back.train, back.examples, strict=True))


def test_the_key_follows_everything_preparation_reads(tmp_path: Path, tokenizer: Any) -> None:
    data = _data(tmp_path)
    spec = _spec(data)
    key = prepared_cache.cache_key(spec, tokenizer)
    assert prepared_cache.cache_key(_spec(data), copy.deepcopy(tokenizer)) == key
    data.write_bytes(data.read_bytes())  # the same bytes written again: by content, not date
    assert prepared_cache.cache_key(spec, tokenizer) == key
    others = {
        "validation seed": _spec(data, validation_seed=5),
        "system prompt": _spec(data, system_prompt="Answer."),
        "max_seq_length": spec.model_copy(
            update={"model": spec.model.model_copy(update={"max_seq_length": 128})}
        ),
    }
    for what, other in others.items():
        assert prepared_cache.cache_key(other, tokenizer) != key, what
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = "{{ messages }}"
    assert prepared_cache.cache_key(spec, templated) != key
    with data.open("a") as fh:  # one more row: other bytes
        fh.write(data.read_text().splitlines()[0] + "\n")
    assert prepared_cache.cache_key(spec, tokenizer) != key
    hub = _spec(data).model_copy(
        update={"dataset": spec.dataset.model_copy(update={"name": "someone/medical-qa"})}
    )
    assert prepared_cache.cache_key(hub, tokenizer) is None


def test_the_least_recently_used_entries_go_past_the_cap(tmp_path: Path, tokenizer: Any) -> None:
    import os

    spec = _spec(_data(tmp_path))
    prepared = _prepared(spec, tokenizer)
    folder = tmp_path / "cache"
    assert prepared_cache.write(folder, "a" * 64, prepared, cap_bytes=1 << 30)
    size = (folder / ("a" * 64 + ".json")).stat().st_size
    os.utime(folder / ("a" * 64 + ".json"), (1, 1))  # long unused
    assert prepared_cache.write(folder, "b" * 64, prepared, cap_bytes=1 << 30)
    os.utime(folder / ("b" * 64 + ".json"), (2, 2))
    assert prepared_cache.read(folder, "b" * 64) is not None  # used now: kept over "a"
    assert prepared_cache.write(folder, "c" * 64, prepared, cap_bytes=2 * size + 10)
    assert sorted(p.name[:1] for p in folder.glob("*.json")) == ["b", "c"]
    assert not prepared_cache.write(folder, "d" * 64, prepared, cap_bytes=size // 2)


def test_a_cache_that_cannot_be_written_is_skipped(tmp_path: Path, tokenizer: Any) -> None:
    # A full or unwritable cache volume must not fail the job whose data was prepared.
    prepared = _prepared(_spec(_data(tmp_path)), tokenizer)
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder should be")
    assert not prepared_cache.write(not_a_folder, "a" * 64, prepared, cap_bytes=1 << 30)
    assert not_a_folder.is_file()


def test_an_entry_removed_while_it_is_read_still_gives_its_data(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another worker's eviction, or DELETE of another job on the same data, between the read
    # and the touch: the job has its data and goes on.
    import os

    prepared = _prepared(_spec(_data(tmp_path)), tokenizer)
    folder = tmp_path / "cache"
    assert prepared_cache.write(folder, "a" * 64, prepared, cap_bytes=1 << 30)

    def gone(path: Any, *args: Any, **kwargs: Any) -> None:
        os.unlink(path)
        raise FileNotFoundError(path)

    monkeypatch.setattr(prepared_cache.os, "utime", gone)
    back = prepared_cache.read(folder, "a" * 64)
    assert back is not None and back.stats == prepared.stats


def test_deleting_a_job_deletes_its_entry(tmp_path: Path, tokenizer: Any, sqlite_url: str) -> None:
    from core.store import jobs, purge
    from core.store.db import session_scope
    from core.store.models import JobStatus

    spec = _spec(_data(tmp_path))
    cache, jobs_dir = tmp_path / "cache", tmp_path / "jobs"
    key = prepared_cache.cache_key(spec, tokenizer)
    assert key is not None
    prepared = _prepared(spec, tokenizer)
    assert prepared_cache.write(cache, key, prepared, cap_bytes=1 << 30)
    assert prepared_cache.write(cache, "e" * 64, prepared, cap_bytes=1 << 30)
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, spec).id
        assert jobs.claim(s, job_id, worker="w")
        jobs.finish(s, job_id, JobStatus.succeeded, artifacts_dir=str(jobs_dir / job_id))
    prepared_cache.record_for_job(jobs_dir / job_id, key)
    # What a worker killed while writing the same entry left: medical text too.
    half_written = cache / f"{key}.json.4242.tmp"
    half_written.write_text('{"format": 1, "examples": [')
    with session_scope(sqlite_url) as s:
        purge.delete_job(s, job_id, owner=None, artifacts_dir=jobs_dir, prepared_cache_dir=cache)
    # The other entry (data no deleted job used) stays.
    assert sorted(p.name for p in cache.iterdir()) == ["e" * 64 + ".json"]
    assert not (jobs_dir / job_id).exists()
