"""A separate validation set (validation_dataset): the spec, its preparation, its statistics,
and a job that measures eval loss and evaluates on it."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from core.data.gate import DatasetGateError
from core.data.prepare import prepare
from core.data.sources import DatasetPathNotAllowed
from core.data.tokenize import IGNORE_INDEX
from core.data.validation import rename_field, resolve_validation, validation_section
from core.errors import DatasetError, DatasetNotFound
from core.spec import SOURCE_FIELDS, DatasetSection, JobSpec, ValidationDataset
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from tests.helpers import recipe_spec, unrepeated_words


def qa_file(path: Path, prefix: str, count: int, *, start: int = 0) -> Path:
    rows = [
        {"question": f"{prefix} question number {i}?", "answer": f"{prefix} answer {i}."}
        for i in range(start, start + count)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def spec_with(validation: dict[str, Any] | None, **dataset: Any) -> JobSpec:
    body: dict[str, Any] = {"training_dataset": {"name": "sample:medical_qa", **dataset}}
    if validation is not None:
        body["validation_dataset"] = validation
    return JobSpec.model_validate(body)


def questions(examples: list[Any]) -> list[str]:
    return [e.messages[1]["content"] for e in examples]


# --- the spec ---------------------------------------------------------------------------------


def test_validation_dataset_takes_the_source_fields_of_a_training_source() -> None:
    # Kept in step with training sources: a field added there belongs here too.
    assert set(ValidationDataset.model_fields) == set(SOURCE_FIELDS)
    spec = spec_with(
        {
            "name": "file:file-abc",
            "format": "records",
            "columns": {"input": "q", "output": "a"},
            "rename_columns": {"Q": "q"},
            "remove_columns": ["junk"],
            "max_samples": 5,
            "split": "test",
            "input_field": "text",
        }
    )
    assert spec.validation_dataset is not None and spec.validation_dataset.max_samples == 5
    again = JobSpec.model_validate(json.loads(json.dumps(spec.to_json())))
    assert again.validation_dataset == spec.validation_dataset
    assert spec_with(None).to_json()["validation_dataset"] is None


def test_validation_dataset_names_are_checked_like_training_names() -> None:
    for bad, loc in (
        ({"name": "no such name"}, ("validation_dataset", "name")),
        ({"name": "file:nope"}, ("validation_dataset", "name")),
        ({}, ("validation_dataset", "name")),
        ({"name": "a.jsonl", "weight": 2}, ("validation_dataset", "weight")),
        ({"name": "a.jsonl", "max_samples": 0}, ("validation_dataset", "max_samples")),
    ):
        with pytest.raises(ValidationError) as info:
            spec_with(bad)
        assert [e["loc"] for e in info.value.errors()] == [loc], bad


def test_validation_dataset_and_validation_share_together_are_refused() -> None:
    with pytest.raises(ValidationError) as info:
        spec_with({"name": "a.jsonl"}, validation_share=0.1)
    (error,) = info.value.errors()
    assert error["loc"] == ("validation_dataset",)
    assert "set validation_share to 0" in error["msg"]
    assert "remove validation_dataset" in error["msg"]
    # An explicit 0 (a stored spec lists every field) is no split of its own.
    assert spec_with({"name": "a.jsonl"}, validation_share=0.0).validation_dataset is not None


def test_the_validation_section_keeps_the_training_settings() -> None:
    training = DatasetSection(
        min_examples=1,
        name="sample:medical_qa",
        system_prompt="Be brief.",
        dedupe="exact",
        chat_template="chatml",
        max_tokens=100,
    )
    section = validation_section(
        training, ValidationDataset(name="v.jsonl", max_samples=3, remove_columns=["x"])
    )
    assert (section.name, section.max_samples, section.remove_columns) == ("v.jsonl", 3, ["x"])
    assert (section.system_prompt, section.dedupe, section.chat_template) == (
        "Be brief.",
        "exact",
        "chatml",
    )
    assert section.max_tokens == 100 and section.validation_share == 0.0
    mixed = DatasetSection.model_validate(
        {"sources": [{"name": "a.jsonl"}], "mix_size": 4, "mix_oversample": True}
    )
    single = validation_section(mixed, ValidationDataset(name="v.jsonl"))
    assert single.sources is None and single.mix_size is None and not single.mix_oversample


def test_error_fields_are_renamed_to_the_validation_dataset() -> None:
    assert rename_field("training_dataset") == "validation_dataset"
    assert rename_field("training_dataset.name") == "validation_dataset.name"
    assert rename_field("training_dataset.columns.question") == (
        "validation_dataset.columns.question"
    )
    assert rename_field("training_dataset.remove_columns") == "validation_dataset.remove_columns"
    # The settings it shares with the training set keep their own names.
    assert rename_field("training_dataset.chat_template") == "training_dataset.chat_template"
    assert rename_field("model_config.max_seq_length") == "model_config.max_seq_length"
    assert rename_field(None) is None


# --- submit-time checks -----------------------------------------------------------------------


def test_the_path_is_checked_at_submit_time(tmp_path: Path) -> None:
    good = qa_file(tmp_path / "v.jsonl", "val", 3)
    assert resolve_validation(spec_with({"name": str(good)})) == good.resolve()
    assert resolve_validation(spec_with(None)) is None
    with pytest.raises(DatasetNotFound) as missing:
        resolve_validation(spec_with({"name": str(tmp_path / "nowhere.jsonl")}))
    assert missing.value.field == "validation_dataset.name"
    assert missing.value.detail.startswith("validation_dataset: ")
    with pytest.raises(DatasetPathNotAllowed) as outside:
        resolve_validation(spec_with({"name": str(good)}), roots=[tmp_path / "elsewhere"])
    assert outside.value.field == "validation_dataset.name"
    with pytest.raises(DatasetNotFound) as no_upload:
        resolve_validation(
            spec_with({"name": "file-0123456789abcdef"}),
            roots=[tmp_path],
            uploads=tmp_path / "uploads",
        )
    assert no_upload.value.field == "validation_dataset.name"


# --- preparation ------------------------------------------------------------------------------


def test_the_validation_set_is_the_validation_split(tmp_path: Path, tokenizer: Any) -> None:
    train = qa_file(tmp_path / "train.jsonl", "train", 12)
    held = qa_file(tmp_path / "val.jsonl", "held", 5)
    spec = spec_with({"name": str(held)})
    section = spec.dataset.model_copy(update={"name": str(train), "min_examples": 1})
    prepared = prepare(section, tokenizer, max_seq_length=256, validation=spec.validation_dataset)
    assert len(prepared.train) == len(prepared.examples) == 12  # nothing held out of training
    assert questions(prepared.validation_examples) == [
        f"held question number {i}?" for i in range(5)
    ]
    assert len(prepared.validation) == 5
    # Rendered and tokenized as the training set: the same template and answer masking.
    first = prepared.validation[0]
    assert tokenizer.decode(first.input_ids).startswith("<|im_start|>system\n")
    labelled = zip(first.input_ids, first.labels, strict=True)
    trained = tokenizer.decode([t for t, label in labelled if label != IGNORE_INDEX])
    assert trained.startswith("held answer 0.") and trained.endswith("<|im_end|>")
    stats = prepared.stats
    assert stats["examples"] == 12 and stats["validation_examples"] == 5
    assert stats["sources"][0]["validation_examples"] == 0  # none from the training source
    validation = stats["validation"]
    assert validation["kind"] == "validation_dataset" and validation["source"] == str(held)
    assert (validation["rows"], validation["examples"], validation["format"]) == (5, 5, "records")
    assert validation["by_source"] == {str(held): 5}
    assert validation["tokens"] == sum(len(i.input_ids) for i in prepared.validation)
    assert validation["gate"]["passed"] is True
    assert "validation_examples" not in validation
    json.dumps(stats)


def test_the_same_cleaning_and_filters_apply(tmp_path: Path, tokenizer: Any) -> None:
    train = qa_file(tmp_path / "train.jsonl", "train", 6)
    held = tmp_path / "val.csv"
    long_answer = unrepeated_words(200)
    held.write_text(
        "Q,A,junk\n"
        "First &amp; foremost?,An   answer.,x\n"
        "First &amp; foremost?,An   answer.,x\n"  # a duplicate
        "No answer?,,x\n"
        f"Long one?,{long_answer},x\n"
        "Second?,Another answer.,x\n",
        encoding="utf-8",
    )
    section = DatasetSection(
        min_examples=1, name=str(train), max_tokens=120, system_prompt="Be brief."
    )
    validation = ValidationDataset(
        name=str(held), columns={"question": "Q", "answer": "A"}, remove_columns=["junk"]
    )
    prepared = prepare(section, tokenizer, max_seq_length=512, validation=validation)
    assert questions(prepared.validation_examples) == ["First & foremost?", "Second?"]
    assert prepared.validation_examples[0].messages[0]["content"] == "Be brief."
    assert prepared.validation_examples[0].messages[2]["content"] == "An answer."
    assert prepared.stats["validation"]["dropped"] == {
        "duplicate_exact": 1,
        "empty_answer": 1,
        "longer_than_max_tokens": 1,
    }
    # The training statistics count the training set's drops only.
    assert prepared.stats["dropped"] == {}


def test_examples_also_in_the_training_set_are_dropped(tmp_path: Path, tokenizer: Any) -> None:
    train = qa_file(tmp_path / "train.jsonl", "shared", 8)
    held = qa_file(tmp_path / "val.jsonl", "shared", 6, start=5)  # 5, 6, 7 are in training
    validation = ValidationDataset(name=str(held))
    prepared = prepare(
        DatasetSection(min_examples=1, name=str(train)),
        tokenizer,
        max_seq_length=256,
        validation=validation,
    )
    assert questions(prepared.validation_examples) == [
        f"shared question number {i}?" for i in (8, 9, 10)
    ]
    assert prepared.stats["validation"]["dropped"] == {"in_training_set": 3}
    # dedupe "none" keeps them: the user asked for no duplicate checks at all.
    kept = prepare(
        DatasetSection(min_examples=1, name=str(train), dedupe="none"),
        tokenizer,
        max_seq_length=256,
        validation=validation,
    )
    assert len(kept.validation) == 6
    # Every example repeated: an empty validation set is an error naming the field and the fix.
    with pytest.raises(DatasetError) as info:
        prepare(
            DatasetSection(min_examples=1, name=str(train)),
            tokenizer,
            max_seq_length=256,
            validation=ValidationDataset(name=str(train)),
        )
    assert info.value.code == "dataset_empty" and info.value.field == "validation_dataset"
    assert "in_training_set" in info.value.detail and "validation_share" in info.value.detail


def test_a_mix_with_a_validation_set(tmp_path: Path, tokenizer: Any) -> None:
    a = qa_file(tmp_path / "a.jsonl", "alpha", 9)
    b = qa_file(tmp_path / "b.jsonl", "beta", 3)
    held = qa_file(tmp_path / "v.jsonl", "gamma", 4)
    spec = JobSpec.model_validate(
        {
            "training_dataset": {
                "sources": [{"name": str(a), "weight": 3}, {"name": str(b)}],
                "min_examples": 1,
            },
            "validation_dataset": {"name": str(held), "max_samples": 2},
        }
    )
    prepared = prepare(
        spec.dataset, tokenizer, max_seq_length=256, validation=spec.validation_dataset
    )
    assert len(prepared.train) == 12 and len(prepared.validation) == 2
    assert [s["validation_examples"] for s in prepared.stats["sources"]] == [0, 0]
    assert prepared.stats["validation"]["rows"] == 2


def test_errors_reading_the_validation_set_name_it(tmp_path: Path, tokenizer: Any) -> None:
    train = DatasetSection(min_examples=1, name=str(qa_file(tmp_path / "train.jsonl", "train", 4)))
    held = tmp_path / "v.csv"
    held.write_text("Q,A\nq?,a.\n", encoding="utf-8")
    with pytest.raises(DatasetError) as columns:
        prepare(
            train,
            tokenizer,
            max_seq_length=256,
            validation=ValidationDataset(name=str(held), columns={"question": "X", "answer": "A"}),
        )
    assert columns.value.code == "dataset_columns"
    assert columns.value.field == "validation_dataset.columns.question"
    assert columns.value.detail.startswith("validation_dataset.columns.question names column 'X'")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"question": "q?", "answer": " "}\n', encoding="utf-8")
    with pytest.raises(DatasetError) as nothing:
        prepare(train, tokenizer, max_seq_length=256, validation=ValidationDataset(name=str(empty)))
    assert nothing.value.code == "dataset_empty" and nothing.value.field == "validation_dataset"


def test_a_validation_set_the_gate_refuses_keeps_both_statistics(
    tmp_path: Path, tokenizer: Any
) -> None:
    train = DatasetSection(
        min_examples=1,
        name=str(qa_file(tmp_path / "train.jsonl", "train", 4)),
        max_truncated_share=0.5,
    )
    held = tmp_path / "v.jsonl"
    long_rows = [{"question": f"long {i}?", "answer": unrepeated_words(300)} for i in range(3)]
    held.write_text("\n".join(json.dumps(r) for r in long_rows), encoding="utf-8")
    with pytest.raises(DatasetGateError) as info:
        prepare(
            copy.deepcopy(train),
            tokenizer,
            max_seq_length=128,
            validation=ValidationDataset(name=str(held)),
        )
    assert info.value.code == "too_many_truncated"
    assert info.value.field == "model_config.max_seq_length"
    assert info.value.detail.startswith("validation_dataset: ")
    stats = info.value.dataset_stats
    assert stats is not None and stats["gate"]["passed"] is True and stats["examples"] == 4
    assert stats["validation"]["gate"]["passed"] is False
    assert stats["validation"]["truncated"] == 3
    json.dumps(stats)


def test_a_share_split_is_reported_as_such(tmp_path: Path, tokenizer: Any) -> None:
    train = qa_file(tmp_path / "train.jsonl", "train", 10)
    shared = prepare(
        DatasetSection(min_examples=1, name=str(train), validation_share=0.2),
        tokenizer,
        max_seq_length=256,
    )
    assert shared.stats["validation"] == {
        "kind": "validation_share",
        "source": str(train),
        "share": 0.2,
        "seed": 42,
        "examples": 2,
    }
    alone = prepare(DatasetSection(min_examples=1, name=str(train)), tokenizer, max_seq_length=256)
    assert alone.stats["validation"] is None and alone.validation == []


# --- a job ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_job_measures_eval_loss_and_evaluates_on_the_validation_set(
    tmp_path: Path, sqlite_url: str, model_cache: Path
) -> None:
    from core.evaluation import EVALUATION_FILE
    from core.pipeline import run_job
    from core.settings import Settings

    train = qa_file(tmp_path / "train.jsonl", "train", 6)
    held = qa_file(tmp_path / "val.jsonl", "held", 2)
    spec = recipe_spec(train, max_steps=2, save_steps=0, eval_strategy="end")
    spec["validation_dataset"] = {"name": str(held)}
    spec["evaluation_config"] = {"enabled": True, "max_examples": 2, "max_new_tokens": 4}
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, JobSpec.model_validate(spec)).id
    settings = Settings(home=tmp_path / "home", database_url=sqlite_url, model_cache=model_cache)
    status = run_job(job_id, settings, worker="w")
    with session_scope(sqlite_url) as s:
        job = jobs.get_job(s, job_id)
        rows, _ = jobs.metrics_page(s, job_id, after_step=-1, limit=100)
    assert status == JobStatus.succeeded, (job.error_code, job.error_message)
    assert job.dataset_stats is not None
    assert job.dataset_stats["examples"] == 6 and job.dataset_stats["validation_examples"] == 2
    assert job.dataset_stats["validation"]["source"] == str(held)
    # eval_strategy "end": the last row carries the loss on the validation set.
    assert rows[-1].step == 2
    assert rows[-1].eval_loss is not None and math.isfinite(rows[-1].eval_loss)
    result = json.loads((settings.artifacts_dir / job_id / EVALUATION_FILE).read_text())
    assert [a["question"] for a in result["answers"]] == [
        "held question number 0?",
        "held question number 1?",
    ]


def test_control_characters_in_a_dataset_name_are_refused() -> None:
    # A NUL in a path failed in the file system (a 500) instead of naming the field.
    for body in (
        {"training_dataset": {"name": "/tmp/a\x00.jsonl"}},
        {"training_dataset": {"sources": [{"name": "/tmp/a\x00.jsonl"}]}},
        {"validation_dataset": {"name": "/tmp/a\x00.jsonl"}},
        {"validation_dataset": {"name": "./a\n.jsonl"}},
    ):
        with pytest.raises(ValidationError, match="control characters are not allowed"):
            JobSpec.model_validate(body)
