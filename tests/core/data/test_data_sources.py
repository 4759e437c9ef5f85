"""Importers and cleaning: MedQuAD XML, column mapping, rename/remove, dedupe, validation split."""

from __future__ import annotations

import csv
import json
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from core.data.cleaning import (
    clean_text,
    dedupe,
    drop_looping,
    normalized_key,
    validation_split,
)
from core.data.conversations import to_examples
from core.data.example import Example
from core.data.mix import collect
from core.data.sources import load, load_rows
from core.errors import DatasetError
from core.spec import DatasetSection, JobSpec
from tests.conftest import SHARED_DATA

MEDQUAD = SHARED_DATA / "medquad"
# One answered <Document>, one <Document> whose answers were removed for copyright (A.D.A.M.),
# one NINDS file in the lower-case <doc> layout.
REAL_FILES = ("8_NHLBI_QA_XML/0000007.xml", "10_MPlus_ADAM_QA", "6_NINDS_QA/0000007.xml")

DOC = """<?xml version="1.0" encoding="UTF-8"?>
<Document id="1" source="TEST" url="http://example.org">
<Focus>Fever</Focus>
<QAPairs>
  <QAPair pid="1"><Question qid="1-1" qtype="information">What is (are) Fever ?</Question>
    <Answer>Fever  &amp;apos;s a high   temperature.
                
       It&apos;s common &amp;amp; usually harmless.</Answer></QAPair>
  <QAPair pid="2"><Question qid="1-2" qtype="treatment">How to treat Fever ?</Question>
    <Answer>   </Answer></QAPair>
  <QAPair pid="3"><Question qid="1-3" qtype="causes">What causes Fever ?</Question>
    <Answer>Infections.</Answer></QAPair>
</QAPairs>
</Document>
"""


def medquad_folder(tmp_path: Path, docs: dict[str, str | bytes]) -> Path:
    folder = tmp_path / "medquad"
    for name, content in docs.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return folder


def real_subset(tmp_path: Path) -> Path:
    folder = tmp_path / "real"
    for name in REAL_FILES:
        source = MEDQUAD / name
        if source.is_dir():
            source = sorted(source.glob("*.xml"))[0]
            name = f"{REAL_FILES[1]}/{source.name}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, folder / name)
    return folder


def count_pairs(folder: Path) -> tuple[int, int]:
    """(answered, unanswered) pairs, counted with regexes, independently of the importer."""
    answered = unanswered = 0
    for path in folder.rglob("*.xml"):
        for answer in re.findall(
            r"<[Aa]nswer>(.*?)</[Aa]nswer>|<[Aa]nswer/>", path.read_text(), re.S
        ):
            if answer.strip():
                answered += 1
            else:
                unanswered += 1
    return answered, unanswered


# --- MedQuAD -------------------------------------------------------------------------------------


def test_real_medquad_files_give_answered_pairs_with_metadata(tmp_path: Path) -> None:
    folder = real_subset(tmp_path)
    loaded = load(DatasetSection(name=f"{folder}/"))
    answered, unanswered = count_pairs(folder)
    assert loaded.format == "medquad"
    assert answered > 0 and unanswered > 0
    assert len(loaded.rows) == answered
    assert loaded.dropped == {"medquad_no_answer": unanswered}
    nhlbi = [r for r in loaded.rows if r["source"] == "NHLBI"]
    ninds = [r for r in loaded.rows if r["source"] == "NINDS"]
    assert nhlbi and ninds  # both XML layouts are read
    assert nhlbi[0]["question"] == "What is (are) ARDS ?"
    assert nhlbi[0]["focus"] == "ARDS" and nhlbi[0]["qtype"] == "information"
    assert ninds[0]["focus"] == "Holmes-Adie" and ninds[0]["qtype"] == "information"
    assert {r["qtype"] for r in nhlbi} >= {"information", "causes"}


def test_medquad_zip_reads_like_the_folder(tmp_path: Path) -> None:
    folder = real_subset(tmp_path)
    archive = tmp_path / "medquad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*.xml")):
            zf.write(path, path.relative_to(folder))
    from_zip = load(DatasetSection(name=str(archive)))
    from_folder = load(DatasetSection(name=f"{folder}/"))
    assert [(r["question"], r["answer"]) for r in from_zip.rows] == [
        (r["question"], r["answer"]) for r in from_folder.rows
    ]
    assert from_zip.dropped == from_folder.dropped


def test_the_whole_shared_corpus_loads(tmp_path: Path) -> None:
    loaded = load(DatasetSection(name=f"{MEDQUAD}/"))
    answered, unanswered = count_pairs(MEDQUAD)
    assert len(loaded.rows) == answered > 10_000
    assert loaded.dropped["medquad_no_answer"] == unanswered


def test_medquad_answers_are_unescaped_and_whitespace_normalised(tmp_path: Path) -> None:
    folder = medquad_folder(tmp_path, {"TEST/1.xml": DOC})
    loaded = load(DatasetSection(name=f"{folder}/"))
    assert loaded.dropped == {"medquad_no_answer": 1}
    conv = to_examples(loaded.rows, system_prompt="S", input_field="prompt")
    answer = conv.examples[0].messages[-1]["content"]  # type: ignore[index]
    assert answer == "Fever 's a high temperature.\n\nIt's common & usually harmless."
    assert conv.examples[0].meta == {
        "row": 0,
        "qtype": "information",
        "focus": "Fever",
        "source": "TEST",
        "document": "TEST/1.xml#1",
    }


def test_malformed_medquad_xml_names_the_file_and_line(tmp_path: Path) -> None:
    bad = DOC.replace("</QAPairs>", "</QAPair>")
    folder = medquad_folder(tmp_path, {"A/1.xml": DOC, "A/2.xml": bad})
    with pytest.raises(DatasetError) as info:
        load(DatasetSection(name=f"{folder}/", on_bad_rows="fail"))
    assert info.value.code == "dataset_format"
    assert info.value.field == "training_dataset.name"
    assert "A/2.xml" in info.value.detail and "line 13" in info.value.detail
    # Skipped by default, but 1 of 2 files is more than max_bad_row_share: the same message.
    with pytest.raises(DatasetError) as info:
        load(DatasetSection(name=f"{folder}/"))
    assert info.value.code == "dataset_bad_rows"
    assert "A/2.xml" in info.value.detail and "line 13" in info.value.detail


def test_medquad_xml_in_a_wrong_encoding_is_dataset_encoding(tmp_path: Path) -> None:
    latin1 = DOC.replace("Infections.", "Fièvre.").encode("latin-1")
    folder = medquad_folder(tmp_path, {"A/1.xml": latin1})
    with pytest.raises(DatasetError) as info:
        load(DatasetSection(name=f"{folder}/"))
    assert info.value.code == "dataset_encoding"
    assert "A/1.xml" in info.value.detail and "UTF-8" in info.value.detail


def test_medquad_xml_declaring_its_encoding_is_read(tmp_path: Path) -> None:
    doc = DOC.replace("UTF-8", "ISO-8859-1").replace("Infections.", "Fièvre.")
    folder = medquad_folder(tmp_path, {"A/1.xml": doc.encode("latin-1")})
    rows = load_rows(DatasetSection(name=f"{folder}/"))
    assert rows[-1]["answer"] == "Fièvre."


@pytest.mark.parametrize(
    ("content", "code"),
    [(b"", "dataset_empty"), (b"<other/>", "dataset_format"), (b"not xml", "dataset_format")],
)
def test_empty_or_foreign_xml_is_a_clear_error(tmp_path: Path, content: bytes, code: str) -> None:
    folder = medquad_folder(tmp_path, {"A/1.xml": content})
    with pytest.raises(DatasetError) as info:
        load(DatasetSection(name=f"{folder}/"))
    assert info.value.code == code
    assert "A/1.xml" in info.value.detail


def test_medquad_with_no_answered_pair_is_dataset_empty(tmp_path: Path) -> None:
    folder = medquad_folder(
        tmp_path, {"A/1.xml": re.sub(r"<Answer>.*?</Answer>", "<Answer/>", DOC, flags=re.S)}
    )
    with pytest.raises(DatasetError) as info:
        load(DatasetSection(name=f"{folder}/"))
    assert info.value.code == "dataset_empty"
    assert "medquad_no_answer" in info.value.detail


def test_corrupt_zip_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "medquad.zip"
    path.write_bytes(b"PK not really")
    with pytest.raises(DatasetError) as info:
        load(DatasetSection(name=str(path)))
    assert info.value.code == "dataset_format"


# --- column mapping, rename, remove ---------------------------------------------------------------


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


TABLE = [
    {"Q": "What is a fever?", "A": "A high temperature.", "Sys": "Be brief.", "id": "1"},
    {"Q": "What lowers it?", "A": "Paracetamol.", "Sys": "", "id": "2"},
]


def test_column_mapping_question_answer_and_system(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", TABLE)
    sec = DatasetSection(name=str(path), columns={"question": "Q", "answer": "A", "system": "Sys"})
    rows = load_rows(sec)
    assert rows[0] == {
        "question": "What is a fever?",
        "answer": "A high temperature.",
        "system": "Be brief.",
    }
    conv = to_examples(rows, system_prompt="Default.", input_field="prompt")
    assert [e.messages[0]["content"] for e in conv.examples] == ["Be brief.", "Default."]  # type: ignore[index]


def test_column_mapping_accepts_input_output_names(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", TABLE)
    sec = DatasetSection(name=str(path), columns={"input": "Q", "output": "A"})
    assert sec.columns is not None and (sec.columns.question, sec.columns.answer) == ("Q", "A")
    assert load_rows(sec)[1] == {"question": "What lowers it?", "answer": "Paracetamol."}


def test_messages_column_from_csv_json_text(tmp_path: Path) -> None:
    chat = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    path = write_csv(tmp_path / "m.csv", [{"conv": json.dumps(chat), "n": "1"}])
    rows = load_rows(DatasetSection(name=str(path), columns={"messages": "conv"}))
    assert rows == [{"messages": chat}]
    conv = to_examples(rows, system_prompt="", input_field="prompt")
    assert conv.layout == "messages" and conv.examples[0].messages == chat


def test_parquet_with_column_mapping(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": "Q1", "a": "A1"}, {"q": "Q2", "a": None}]), path)
    rows = load_rows(DatasetSection(name=str(path), columns={"question": "q", "answer": "a"}))
    conv = to_examples(rows, system_prompt="", input_field="prompt")
    assert len(conv.examples) == 1 and conv.dropped == {"empty_answer": 1}


def test_csv_without_the_mapped_columns_names_the_mapping(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", TABLE)
    with pytest.raises(DatasetError) as info:
        load_rows(DatasetSection(name=str(path), columns={"question": "question", "answer": "A"}))
    err = info.value
    assert err.code == "dataset_columns"
    assert err.field == "training_dataset.columns.question"
    assert "'question'" in err.detail and "'Q'" in err.detail


def test_rename_and_remove_steps_run_before_detection(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", TABLE)
    sec = DatasetSection(
        name=str(path),
        rename_columns={"Q": "question", "A": "answer"},
        remove_columns=["Sys", "id"],
    )
    assert load_rows(sec)[0] == {"question": "What is a fever?", "answer": "A high temperature."}
    with pytest.raises(DatasetError) as info:
        load_rows(DatasetSection(name=str(path), remove_columns=["nope"]))
    assert info.value.field == "training_dataset.remove_columns"


@pytest.mark.parametrize(
    "columns",
    [
        {"question": "q"},
        {"messages": "m", "question": "q", "answer": "a"},
        {"question": "q", "answer": "a", "x": "y"},
    ],
)
def test_bad_column_mappings_are_rejected_by_the_spec(columns: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        JobSpec.model_validate({"training_dataset": {"name": "a.csv", "columns": columns}})


def test_recipe_layout_stays_valid_and_new_fields_default() -> None:
    spec = JobSpec.model_validate(
        {
            "training_dataset": {
                "name": "sample:medical_qa",
                "split": "train",
                "input_field": "prompt",
            }
        }
    )
    assert spec.dataset.chat_template == "auto"
    assert spec.dataset.train_on_prompt is False
    assert spec.dataset.max_truncated_share == 0.05
    assert JobSpec.model_validate(spec.to_json()) == spec


@pytest.mark.parametrize(
    "extra",
    [
        {"chat_template": "vicuna"},
        {"max_truncated_share": 1.5},
        {"validation_share": 0.9},
        {"min_tokens": 10, "max_tokens": 5},
    ],
)
def test_dataset_options_are_bounded(extra: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        DatasetSection(name="sample:medical_qa", **extra)


def test_medquad_zip_name_is_a_path_not_a_hub_id() -> None:
    assert DatasetSection(name="data/medquad.zip").kind == "path"


# --- cleaning ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  a\u00a0 b\t\tc  ", "a b c"),
        ("x &amp;amp; y &lt;z&gt;", "x & y <z>"),
        ("p1  \n     \n   \n  p2", "p1\n\np2"),
        ("line\r\nnext", "line\nnext"),
        (float("nan"), ""),
        (None, ""),
        ("NaN", ""),
        (42, "42"),
    ],
)
def test_clean_text(raw: Any, clean: str) -> None:
    assert clean_text(raw) == clean


def qa(question: str, answer: str) -> Example:
    return Example(
        messages=[
            {"role": "system", "content": "S"},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    )


def test_dedupe_exact_and_normalised() -> None:
    examples = [
        qa("What is a fever?", "Heat."),
        qa("What is a fever?", "Heat."),
        qa("what is a FEVER", "heat"),
        qa("What is a fever?", "Something else."),
    ]
    kept, dropped = dedupe(examples, "normalized")
    assert kept == [examples[0], examples[3]]
    assert dropped == {"duplicate_exact": 1, "duplicate_normalized": 1}
    kept, dropped = dedupe(examples, "exact")
    assert len(kept) == 3 and dropped == {"duplicate_exact": 1}
    assert dedupe(examples, "none") == (examples, {})
    assert normalized_key("Fièvre, HIGH!") == normalized_key("fievre high")


LOOPING = "Rest and fluids help the body recover from the infection. " * 3


def test_answers_that_loop_are_dropped_and_questions_that_loop_are_not() -> None:
    examples = [
        qa("What helps a cold?", LOOPING),
        qa(LOOPING, "Rest."),
        qa("What helps a cold?", "Rest and fluids help the body recover from the infection."),
        Example(text=LOOPING),  # a raw-text document: continued pretraining keeps it
    ]
    kept, dropped = drop_looping(examples)
    assert kept == examples[1:] and dropped == {"answer_loops": 1}
    assert drop_looping(examples[1:]) == (examples[1:], {})


def test_a_file_with_a_looping_answer_trains_without_it_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    rows = [
        {"question": "What helps a cold?", "answer": LOOPING},
        {"question": "What is a fever?", "answer": "A body temperature above 38 C."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    collected = collect(DatasetSection(name=str(path)))
    assert [e.messages[1]["content"] for e in collected.examples if e.messages] == [
        "What is a fever?"
    ]
    assert collected.dropped["answer_loops"] == 1
    kept = collect(DatasetSection(name=str(path), drop_looping_answers=False))
    assert len(kept.examples) == 2 and "answer_loops" not in kept.dropped


def test_validation_split_is_seed_stable_and_order_free() -> None:
    examples = [qa(f"Question {i}?", f"Answer {i}.") for i in range(200)]
    train, val = validation_split(examples, share=0.1, seed=7)
    assert len(val) == 20 and len(train) == 180
    assert not {id(e) for e in val} & {id(e) for e in train}
    again = validation_split(list(reversed(examples)), share=0.1, seed=7)[1]
    assert {id(e) for e in again} == {id(e) for e in val}
    other = validation_split(examples, share=0.1, seed=8)[1]
    assert {id(e) for e in other} != {id(e) for e in val}
    assert validation_split(examples, share=0.0, seed=7) == (examples, [])
