"""Unreadable rows and files are counted and skipped up to a share; too few examples fail early.

The MedQuAD tests read the real corpus in ../shared/data/medquad (its NINDS collection has both
of the published layouts); the product itself never needs it.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest

from core.data.gate import DatasetGateError
from core.data.prepare import prepare
from core.data.sources import load
from core.errors import DatasetError
from core.pipeline import run_job
from core.settings import Settings
from core.spec import DatasetSection, JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from tests.conftest import SHARED_DATA
from tests.helpers import recipe_spec, zip_bytes

NINDS = SHARED_DATA / "medquad" / "6_NINDS_QA"


def qa_rows(count: int, prefix: str = "q") -> list[dict[str, str]]:
    return [
        {"question": f"{prefix} question {i}?", "answer": f"{prefix} answer {i}."}
        for i in range(count)
    ]


def jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ninds_copy(tmp_path: Path) -> Path:
    """The real NINDS collection: <Document> files and the lower-case <doc> ones."""
    folder = tmp_path / "medquad" / NINDS.name
    shutil.copytree(NINDS, folder)
    return folder


# --- MedQuAD: every published layout, and a broken file dropped and counted -------------------


def test_a_collection_with_a_broken_file_loads_the_rest_and_counts_it(tmp_path: Path) -> None:
    folder = ninds_copy(tmp_path)
    whole = load(DatasetSection(name=f"{folder}/"))
    files = sorted(folder.glob("*.xml"))
    assert {ET.parse(f).getroot().tag for f in files} == {"Document", "doc"}
    # One real file cut short: not XML any more. Before, it failed the whole collection.
    broken = files[3]
    lost = len(load(DatasetSection(name=str(broken))).rows)
    broken.write_bytes(broken.read_bytes()[:-200])
    loaded = load(DatasetSection(name=f"{folder}/"))
    assert len(loaded.rows) == len(whole.rows) - lost > 1000
    assert loaded.dropped["medquad_file_format"] == 1
    # The same zipped: members are files too.
    archive = tmp_path / "ninds.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for file in files:
            z.write(file, f"{NINDS.name}/{file.name}")
    zipped = load(DatasetSection(name=str(archive)))
    assert len(zipped.rows) == len(loaded.rows)
    assert zipped.dropped["medquad_file_format"] == 1
    # on_bad_rows "fail" keeps the old behaviour: the broken file fails the read, by name.
    with pytest.raises(DatasetError) as info:
        load(DatasetSection(name=f"{folder}/", on_bad_rows="fail"))
    assert info.value.code == "dataset_format" and broken.name in info.value.detail


@pytest.mark.parametrize(
    "root",
    ["MedQuADDocument", "document", "{http://example.org/medquad}Document"],
    ids=["other-name", "lower-case", "namespaced"],
)
def test_a_document_under_another_root_is_read(tmp_path: Path, root: str) -> None:
    real = sorted(NINDS.glob("*.xml"))[0]
    text = real.read_text(encoding="utf-8")
    expected = load(DatasetSection(name=str(real))).rows
    start = text.index("<Document")
    tag, _, rest = text[start + 1 :].partition(" ")
    if root.startswith("{"):
        namespace, name = root[1:].split("}")
        opening = f'<{name} xmlns="{namespace}" {rest}'
    else:
        name, opening = root, f"<{root} {rest}"
    changed = text[:start] + opening.replace(f"</{tag}>", f"</{name}>")
    (tmp_path / "one.xml").write_text(changed, encoding="utf-8")
    rows = load(DatasetSection(name=str(tmp_path / "one.xml"))).rows
    assert [(r["question"], r["answer"], r["focus"]) for r in rows] == [
        (r["question"], r["answer"], r["focus"]) for r in expected
    ]
    assert rows and rows[0]["focus"]


def test_too_many_broken_files_fail_with_a_share_and_a_fix(tmp_path: Path) -> None:
    folder = tmp_path / "few"
    folder.mkdir()
    for file in sorted(NINDS.glob("*.xml"))[:10]:
        shutil.copy(file, folder / file.name)
    for file in sorted(folder.glob("*.xml"))[:2]:
        file.write_text("<html>not MedQuAD</html>", encoding="utf-8")
    with pytest.raises(DatasetError) as info:
        load(DatasetSection(name=f"{folder}/"))
    assert info.value.code == "dataset_bad_rows"
    assert info.value.field == "training_dataset.name"
    assert "2 of 10 MedQuAD files" in info.value.detail
    assert "max_bad_row_share" in info.value.detail and "<html>" in info.value.detail
    stats = getattr(info.value, "dataset_stats", None)
    assert stats == {"rows": 10, "dropped": {"medquad_file_format": 2}}
    loaded = load(DatasetSection(name=f"{folder}/", max_bad_row_share=0.2))
    assert loaded.dropped["medquad_file_format"] == 2 and loaded.rows


def test_when_no_file_is_readable_the_first_files_own_error_says_why(tmp_path: Path) -> None:
    (tmp_path / "a.xml").write_text("<html/>", encoding="utf-8")
    (tmp_path / "b.xml").write_bytes(b"")
    with pytest.raises(DatasetError) as info:
        load(DatasetSection(name=f"{tmp_path}/", max_bad_row_share=1.0))
    assert info.value.code == "dataset_format" and "a.xml" in info.value.detail


# --- records: JSONL, JSON, CSV ----------------------------------------------------------------


def test_one_broken_jsonl_line_is_skipped_and_counted(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in qa_rows(40)]
    lines[7] = '{"question": "cut short'
    lines[20] = "[1, 2]"
    path = jsonl(tmp_path / "data.jsonl", lines)
    loaded = load(DatasetSection(name=str(path)))
    assert len(loaded.rows) == 38
    assert loaded.dropped == {"bad_row_invalid_json": 1, "bad_row_not_an_object": 1}
    with pytest.raises(DatasetError) as info:
        load(DatasetSection(name=str(path), on_bad_rows="fail"))
    assert info.value.code == "dataset_format" and "line 8" in info.value.detail


def test_a_csv_with_three_of_four_rows_broken_fails(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text(
        "question,answer\n"
        '"What is a fever?","A high temperature."\n'
        "What is anemia?,Too few red cells, or too little haemoglobin.\n"
        "What is a cough?\n"
        "What is a rash?,Red skin,itchy,sore\n",
        encoding="utf-8",
    )
    with pytest.raises(DatasetError) as info:
        load(DatasetSection(name=str(path)))
    assert info.value.code == "dataset_bad_rows"
    assert "3 of 4 rows" in info.value.detail and "bad_row_cell_count: 3" in info.value.detail
    assert "line 3 has 3 cells where the header has 2" in info.value.detail
    # Allowed: the readable row alone, the others counted.
    loaded = load(DatasetSection(name=str(path), max_bad_row_share=0.75))
    assert [r["question"] for r in loaded.rows] == ["What is a fever?"]
    assert loaded.dropped == {"bad_row_cell_count": 3}


def test_json_items_that_are_not_objects_are_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([*qa_rows(30), "stray text"]), encoding="utf-8")
    loaded = load(DatasetSection(name=str(path)))
    assert len(loaded.rows) == 30 and loaded.dropped == {"bad_row_not_an_object": 1}


# --- min_examples -------------------------------------------------------------------------------


def test_the_shipped_sample_passes_the_default_min_examples(tokenizer: Any) -> None:
    section = DatasetSection(name="sample:medical_qa")
    assert section.min_examples == 16
    prepared = prepare(section, tokenizer, max_seq_length=512)
    assert len(prepared.train) >= 16


def test_fewer_examples_than_min_examples_fail_with_the_statistics(
    tmp_path: Path, tokenizer: Any
) -> None:
    rows = [*qa_rows(12), {"question": "empty?", "answer": ""}, qa_rows(1)[0]]
    path = jsonl(tmp_path / "small.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(DatasetGateError) as info:
        prepare(DatasetSection(name=str(path)), tokenizer, max_seq_length=256)
    assert info.value.code == "dataset_too_small"
    assert info.value.field == "training_dataset.min_examples"
    assert "12 training example(s)" in info.value.detail and "(16)" in info.value.detail
    stats = info.value.dataset_stats
    assert stats is not None and stats["examples"] == 12
    assert stats["dropped"] == {"empty_answer": 1, "duplicate_exact": 1}
    # The held-out share counts against it too; an explicit min_examples lets a small set train.
    with pytest.raises(DatasetGateError):
        prepare(
            DatasetSection(name=str(path), min_examples=12, validation_share=0.25),
            tokenizer,
            max_seq_length=256,
        )
    section = DatasetSection(name=str(path), min_examples=12)
    assert len(prepare(section, tokenizer, max_seq_length=256).train) == 12


# --- on the worker --------------------------------------------------------------------------


def run(tmp_path: Path, sqlite_url: str, model_cache: Path, spec: dict[str, Any]) -> Any:
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, JobSpec.model_validate(spec)).id
    settings = Settings(home=tmp_path / "home", database_url=sqlite_url, model_cache=model_cache)
    run_job(job_id, settings, worker="w")
    with session_scope(sqlite_url) as s:
        return jobs.get_job(s, job_id)


def test_a_job_on_mostly_broken_csv_fails_before_loading_the_model(
    tmp_path: Path, sqlite_url: str, model_cache: Path
) -> None:
    path = tmp_path / "broken.csv"
    path.write_text(
        "question,answer\nWhat is a fever?,A high temperature.\nQ1?\nQ2?\nQ3?,a,b\n",
        encoding="utf-8",
    )
    job = run(tmp_path, sqlite_url, model_cache, recipe_spec(path, max_steps=1))
    assert job.status == JobStatus.failed and job.error_code == "dataset_bad_rows"
    assert job.engine is None  # failed in the data stage: no model was loaded
    assert job.dataset_stats == {"rows": 4, "dropped": {"bad_row_cell_count": 3}}


def test_a_job_below_min_examples_fails_before_loading_the_model(
    tmp_path: Path, sqlite_url: str, model_cache: Path
) -> None:
    path = jsonl(tmp_path / "ten.jsonl", [json.dumps(r) for r in qa_rows(10)])
    spec = recipe_spec(path, max_steps=1)
    del spec["training_dataset"]["min_examples"]  # the default, 16
    job = run(tmp_path, sqlite_url, model_cache, spec)
    assert job.status == JobStatus.failed and job.error_code == "dataset_too_small"
    assert job.engine is None
    assert job.dataset_stats is not None and job.dataset_stats["examples"] == 10


@pytest.mark.slow
def test_a_job_with_one_broken_line_trains_on_the_rest(
    tmp_path: Path, sqlite_url: str, model_cache: Path
) -> None:
    lines = [json.dumps(r) for r in qa_rows(24)]
    lines.insert(5, '{"question": "cut')
    path = jsonl(tmp_path / "data.jsonl", lines)
    spec = recipe_spec(path, max_steps=1, save_steps=0)
    del spec["training_dataset"]["min_examples"]
    job = run(tmp_path, sqlite_url, model_cache, spec)
    assert job.status == JobStatus.succeeded, (job.error_code, job.error_message)
    assert job.dataset_stats["rows"] == 25 and job.dataset_stats["examples"] == 24
    assert job.dataset_stats["dropped"] == {"bad_row_invalid_json": 1}


def test_a_zip_member_that_cannot_be_unpacked_is_a_bad_file(tmp_path: Path) -> None:
    files = {f"A/{f.name}": f.read_bytes() for f in sorted(NINDS.glob("*.xml"))[:30]}
    data = bytearray(zip_bytes(files))
    # Damage the first member's stored bytes: its CRC no longer matches.
    at = data.index(b"<?xml")
    data[at + 100 : at + 110] = b"\x00" * 10
    path = tmp_path / "damaged.zip"
    path.write_bytes(bytes(data))
    loaded = load(DatasetSection(name=str(path)))
    assert loaded.dropped["medquad_file_format"] == 1
    assert {r["document"].split("#")[0] for r in loaded.rows} == set(files) - {min(files)}
