"""Continued pretraining on raw text: format "text" (JSONL/CSV/Parquet rows, .txt files), every
token trained, EOS appended, no chat template, long documents split into windows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.data.prepare import prepare
from core.data.tokenize import IGNORE_INDEX
from core.errors import DatasetError
from core.spec import DatasetSection

WORDS = ["anemia", "iron", "ferritin", "hemoglobin", "fatigue", "pallor", "transfusion", "marrow"]


def _doc(index: int, words: int) -> str:
    return " ".join(WORDS[(index + i) % len(WORDS)] for i in range(words)) + f" doc{index}."


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _section(path: Path, **fields: Any) -> DatasetSection:
    return DatasetSection(name=str(path), format="text", min_examples=1, dedupe="exact", **fields)


def test_every_token_is_trained_and_ends_in_eos(tmp_path: Path, tokenizer: Any) -> None:
    path = _jsonl(tmp_path / "corpus.jsonl", [{"text": _doc(i, 12)} for i in range(6)])
    chat_template = tokenizer.chat_template
    prepared = prepare(_section(path), tokenizer, max_seq_length=256)
    assert tokenizer.chat_template == chat_template  # nothing rendered through it
    assert len(prepared.train) == 6
    for example, item in zip(prepared.examples, prepared.train, strict=True):
        assert item.labels == item.input_ids and IGNORE_INDEX not in item.labels
        assert item.input_ids[-1] == tokenizer.eos_token_id
        # The document's own tokens, as the tokenizer makes them, and nothing else.
        text = tokenizer.decode(item.input_ids[:-1])
        assert text == example.text and "<|im_start|>" not in text
    stats = prepared.stats
    assert stats["format"] == "text" and stats["layout"] == "text"
    assert stats["trained_token_share"] == 1.0
    assert stats["system_prompt"]["none"] == 6


def test_a_long_document_is_split_into_windows_not_cut(tmp_path: Path, tokenizer: Any) -> None:
    long_doc, short_doc = _doc(0, 300), _doc(1, 10)
    path = _jsonl(tmp_path / "corpus.jsonl", [{"text": long_doc}, {"text": short_doc}])
    prepared = prepare(_section(path), tokenizer, max_seq_length=64)
    ids = tokenizer(long_doc)["input_ids"] + [tokenizer.eos_token_id]
    windows = [item.input_ids for item in prepared.train if item.meta.get("row") == 0]
    assert len(windows) == -(-len(ids) // 64) > 1
    assert [t for w in windows for t in w] == ids  # every token once, in order, EOS last
    assert all(len(w) == 64 for w in windows[:-1])
    assert not any(item.truncated for item in prepared.train)  # the gate has nothing to refuse
    assert prepared.stats["truncated"] == 0
    assert all(i.labels == i.input_ids for i in prepared.train)


def test_a_documents_windows_stay_on_one_side_of_the_split(tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"text": _doc(i, 120)} for i in range(10)]
    path = _jsonl(tmp_path / "corpus.jsonl", rows)
    prepared = prepare(_section(path, validation_share=0.3), tokenizer, max_seq_length=32)
    train_rows = {e.meta["row"] for e in prepared.examples}
    held_rows = {e.meta["row"] for e in prepared.validation_examples}
    assert held_rows and train_rows
    # At most the one document at the cut of the split has windows on both sides.
    assert len(train_rows & held_rows) <= 1


def test_txt_files_are_documents(tmp_path: Path, tokenizer: Any) -> None:
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_text(_doc(0, 40) + "\n\n" + _doc(1, 40) + "\n")
    (folder / "b.txt").write_text(_doc(2, 20))
    # Format "text" reads a folder's .txt files, each one document.
    prepared = prepare(_section(folder), tokenizer, max_seq_length=512)
    assert prepared.stats["format"] == "text"
    assert [e.meta["document"] for e in prepared.examples] == ["a.txt", "b.txt"]
    assert "\n\n" in (prepared.examples[0].text or "")
    assert all(i.labels == i.input_ids for i in prepared.train)
    # A .txt file under format "auto" is raw text too; a folder's README.txt stays no data.
    single = DatasetSection(name=str(folder / "a.txt"), min_examples=1)
    assert prepare(single, tokenizer, max_seq_length=512).stats["format"] == "text"
    with pytest.raises(DatasetError) as no_data:
        prepare(DatasetSection(name=f"{folder}/", min_examples=1), tokenizer, max_seq_length=64)
    assert no_data.value.code == "dataset_empty"


def test_the_text_column_is_input_field_else_text(tmp_path: Path, tokenizer: Any) -> None:
    path = _jsonl(tmp_path / "c.jsonl", [{"body": _doc(i, 8), "text": "x"} for i in range(3)])
    prepared = prepare(_section(path, input_field="body"), tokenizer, max_seq_length=64)
    assert [e.text for e in prepared.examples] == [_doc(i, 8) for i in range(3)]
    path = _jsonl(tmp_path / "d.jsonl", [{"content": "x"}])
    with pytest.raises(DatasetError) as missing:
        prepare(_section(path), tokenizer, max_seq_length=64)
    assert missing.value.code == "dataset_columns"
    assert missing.value.field == "training_dataset.input_field"


def test_chat_rows_read_as_text_are_still_text(tmp_path: Path, tokenizer: Any) -> None:
    # format "text" never renders a conversation, whatever other columns a row has.
    rows = [{"question": f"q{i}", "answer": f"a{i}", "text": _doc(i, 6)} for i in range(3)]
    path = _jsonl(tmp_path / "qa.jsonl", rows)
    prepared = prepare(_section(path), tokenizer, max_seq_length=64)
    assert all(e.messages is None and e.raw for e in prepared.examples)
