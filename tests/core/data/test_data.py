"""Dataset stage: load rows, map them to conversations, tokenize with answer-only labels."""

from __future__ import annotations

import copy
import csv
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from core.data.conversations import detect_layout, to_examples
from core.data.example import Example
from core.data.sources import SAMPLES, load_rows, resolve_local, sample_path
from core.data.tokenize import IGNORE_INDEX, encode, encode_all
from core.errors import DatasetError, DatasetNotFound, HubUnavailable, MedtuneError
from core.spec import RECIPE_SYSTEM_PROMPT, DatasetSection

ROWS: list[dict[str, Any]] = [
    {"question": "What is a fever?", "answer": "A body temperature above 38 C."},
    {"question": "What lowers a fever?", "answer": "Paracetamol or ibuprofen, and fluids."},
    {"question": "Is a fever dangerous?", "answer": "Rarely; very high fevers need care."},
]


def section(name: str | Path, **kwargs: Any) -> DatasetSection:
    return DatasetSection(name=str(name), **kwargs)


def raises(exc_type: type[MedtuneError], sec: DatasetSection) -> MedtuneError:
    with pytest.raises(exc_type) as info:
        load_rows(sec)
    return info.value


# --- sources ------------------------------------------------------------------------------


def test_sample_loads_all_rows_in_recipe_layout() -> None:
    rows = load_rows(section("sample:medical_qa"))
    lines = sample_path("sample:medical_qa").read_text(encoding="utf-8").splitlines()
    assert len(rows) == len([line for line in lines if line.strip()]) == 80
    assert set(rows[0]) == {"instruction", "input", "output"}
    assert rows[0] == json.loads(lines[0])


def test_max_samples_keeps_the_first_rows() -> None:
    rows = load_rows(section("sample:medical_qa", max_samples=3))
    assert rows == load_rows(section("sample:medical_qa"))[:3]


def test_jsonl_loads_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text(
        json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n   \n" + json.dumps(ROWS[2]),
        encoding="utf-8",
    )
    assert load_rows(section(path)) == ROWS


@pytest.mark.parametrize("wrapped", [False, True])
def test_json_list_and_data_object_load(tmp_path: Path, wrapped: bool) -> None:
    path = tmp_path / "qa.json"
    path.write_text(json.dumps({"data": ROWS} if wrapped else ROWS), encoding="utf-8")
    assert load_rows(section(path)) == ROWS


def test_csv_loads_as_string_rows(tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows(ROWS)
    assert load_rows(section(path)) == ROWS


def test_parquet_loads(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_rows(section(path)) == ROWS


def test_folder_loads_every_data_file_in_name_order(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "b.jsonl").write_text(json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    (folder / "a.json").write_text(json.dumps([ROWS[0]]), encoding="utf-8")
    (folder / "notes.txt").write_text("not data", encoding="utf-8")
    assert load_rows(section(f"{folder}/")) == ROWS[:2]


def test_malformed_jsonl_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + '{"question": "x", \n',
        encoding="utf-8",
    )
    err = raises(DatasetError, section(path, on_bad_rows="fail"))
    assert err.code == "dataset_format"
    assert err.field == "training_dataset.name"
    assert "line 3" in err.detail
    assert "bad.jsonl" in err.detail


def test_jsonl_line_that_is_not_an_object_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n", encoding="utf-8")
    err = raises(DatasetError, section(path))
    assert err.code == "dataset_bad_rows"  # 1 of 2 lines: above the 5% that may be skipped
    assert "line 2" in err.detail


def test_json_that_is_not_a_list_of_objects_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "scalar.json"
    path.write_text(json.dumps({"rows": ROWS}), encoding="utf-8")
    assert raises(DatasetError, section(path)).code == "dataset_format"


@pytest.mark.parametrize(
    ("filename", "content"),
    [
        ("e.jsonl", ""),
        ("e.jsonl", "\n \n"),
        ("e.csv", ""),
        ("e.csv", "question,answer\n"),
        ("e.json", "[]"),
    ],
)
def test_empty_file_is_dataset_empty(tmp_path: Path, filename: str, content: str) -> None:
    path = tmp_path / filename
    path.write_text(content, encoding="utf-8")
    err = raises(DatasetError, section(path))
    assert err.code == "dataset_empty"
    assert err.field == "training_dataset.name"


def test_zero_byte_json_file_is_dataset_empty(tmp_path: Path) -> None:
    path = tmp_path / "e.json"
    path.write_bytes(b"")
    assert raises(DatasetError, section(path)).code == "dataset_empty"


@pytest.mark.parametrize("content", [b"", b"this is not parquet"])
def test_corrupt_parquet_is_a_format_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(content)
    err = raises(DatasetError, section(path))
    assert err.code == "dataset_format"
    assert err.field == "training_dataset.name"


def test_folder_without_data_files_is_dataset_empty(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hello", encoding="utf-8")
    assert raises(DatasetError, section(f"{tmp_path}/")).code == "dataset_empty"


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_non_utf8_file_is_dataset_encoding(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"latin1{suffix}"
    text = {
        ".jsonl": '{"question": "Fièvre?", "answer": "Oui"}\n',
        ".csv": "question,answer\nFièvre?,Oui\n",
        ".json": '[{"question": "Fièvre?", "answer": "Oui"}]',
    }[suffix]
    path.write_bytes(text.encode("latin-1"))
    err = raises(DatasetError, section(path))
    assert err.code == "dataset_encoding"
    assert err.field == "training_dataset.name"
    assert "UTF-8" in err.detail


def test_missing_path_is_dataset_not_found(tmp_path: Path) -> None:
    sec = section(tmp_path / "nowhere" / "qa.jsonl")
    err = raises(DatasetNotFound, sec)
    assert err.code == "dataset_not_found"
    assert err.status == 422
    assert err.field == "training_dataset.name"
    with pytest.raises(DatasetNotFound):
        resolve_local(sec)


def test_unknown_sample_is_dataset_not_found() -> None:
    err = raises(DatasetNotFound, section("sample:cardiology"))
    assert err.code == "dataset_not_found"
    assert err.field == "training_dataset.name"
    for key in SAMPLES:
        assert f"sample:{key}" in err.detail


def test_hub_ids_are_not_resolved_locally() -> None:
    assert resolve_local(section("owner/some-set")) is None


def test_hub_dataset_offline_is_hub_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The hub libraries read the variable once, at import; patch their copies in case an earlier
    # test imported them.
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    name = f"medtune-tests/absent-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    err = raises(HubUnavailable, section(name))
    elapsed = time.monotonic() - started
    assert err.code == "hub_offline"
    assert err.status == 424
    assert err.field == "training_dataset.name"
    assert name in err.detail and "sample:medical_qa" in err.detail
    assert elapsed < 15, f"offline Hub lookup took {elapsed:.1f} s"


# --- conversations --------------------------------------------------------------------------


def test_alpaca_with_input_makes_instruction_the_system_turn() -> None:
    rows = [
        {
            "instruction": "You are a cardiologist.",
            "input": "What is AF?",
            "output": "An arrhythmia.",
        }
    ]
    conv = to_examples(rows, system_prompt="IGNORED", input_field="prompt")
    assert conv.layout == "alpaca"
    assert conv.examples[0].messages == [
        {"role": "system", "content": "You are a cardiologist."},
        {"role": "user", "content": "What is AF?"},
        {"role": "assistant", "content": "An arrhythmia."},
    ]
    assert conv.examples[0].text is None
    assert not conv.dropped


@pytest.mark.parametrize("row_input", ["", "   ", None])
def test_alpaca_without_input_makes_instruction_the_user_turn(row_input: str | None) -> None:
    row: dict[str, Any] = {"instruction": "Define anemia.", "output": "Too few red cells."}
    if row_input is not None:
        row["input"] = row_input
    conv = to_examples([row], system_prompt=RECIPE_SYSTEM_PROMPT, input_field="prompt")
    assert conv.layout == "alpaca"
    assert conv.examples[0].messages == [
        {"role": "system", "content": RECIPE_SYSTEM_PROMPT},
        {"role": "user", "content": "Define anemia."},
        {"role": "assistant", "content": "Too few red cells."},
    ]


def test_alpaca_without_input_and_empty_system_prompt_has_no_system_turn() -> None:
    conv = to_examples(
        [{"instruction": "Define anemia.", "output": "Too few red cells."}],
        system_prompt="",
        input_field="prompt",
    )
    assert [m["role"] for m in conv.examples[0].messages or []] == ["user", "assistant"]


@pytest.mark.parametrize(
    ("question_key", "answer_key"),
    [("question", "answer"), ("query", "response"), ("prompt_text", "completion")],
)
def test_question_answer_rows_use_the_system_prompt(question_key: str, answer_key: str) -> None:
    rows = [{question_key: "  What is a fever? ", answer_key: "A high temperature.\n"}]
    conv = to_examples(rows, system_prompt="Be brief.", input_field="prompt")
    assert conv.layout == "qa"
    assert conv.examples[0].messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a fever?"},
        {"role": "assistant", "content": "A high temperature."},
    ]


def test_messages_rows_keep_their_turns_and_get_the_system_prompt_when_missing() -> None:
    own_system = [
        {"role": "system", "content": "Own."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
    ]
    no_system = [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    conv = to_examples(
        [{"messages": own_system}, {"messages": no_system}],
        system_prompt="Default.",
        input_field="prompt",
    )
    assert conv.layout == "messages"
    assert conv.examples[0].messages == own_system
    assert conv.examples[1].messages == [{"role": "system", "content": "Default."}, *no_system]


def test_messages_rows_without_a_final_assistant_answer_are_dropped() -> None:
    good = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    rows = [
        {"messages": good},
        {"messages": [{"role": "user", "content": "Q"}]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " "}]},
        {"messages": []},
    ]
    conv = to_examples(rows, system_prompt="", input_field="prompt")
    assert [e.messages for e in conv.examples] == [good]
    assert conv.dropped == {"no_final_assistant_turn": 3}


def test_text_rows_use_the_input_field() -> None:
    rows = [{"prompt": "### Q: fever?\n### A: heat."}, {"prompt": "   "}, {"prompt": "x y"}]
    conv = to_examples(rows, system_prompt="unused", input_field="prompt")
    assert conv.layout == "text"
    assert [e.text for e in conv.examples] == ["### Q: fever?\n### A: heat.", "x y"]
    assert all(e.messages is None for e in conv.examples)
    assert conv.dropped == {"empty_text": 1}


def test_custom_input_field_is_honoured() -> None:
    conv = to_examples([{"body": "text here"}], system_prompt="", input_field="body")
    assert conv.layout == "text"
    assert conv.examples[0].text == "text here"


def test_rows_with_empty_answers_or_questions_are_dropped_and_counted() -> None:
    rows = [
        {"question": "Q1", "answer": "A1"},
        {"question": "Q2", "answer": ""},
        {"question": "Q3", "answer": "   "},
        {"question": "Q4", "answer": None},
        {"question": "Q5", "answer": float("nan")},  # what pandas/parquet give for a blank cell
        {"question": "", "answer": "A6"},
        {"question": "Q7", "answer": "A7"},
    ]
    conv = to_examples(rows, system_prompt="S", input_field="prompt")
    assert [e.messages[1]["content"] for e in conv.examples if e.messages] == ["Q1", "Q7"]
    assert conv.dropped == {"empty_answer": 4, "empty_question": 1}
    assert len(conv.examples) + sum(conv.dropped.values()) == len(rows)


def test_alpaca_rows_with_empty_output_are_dropped() -> None:
    rows = [
        {"instruction": "S", "input": "Q1", "output": "A1"},
        {"instruction": "S", "input": "Q2", "output": ""},
    ]
    conv = to_examples(rows, system_prompt="", input_field="prompt")
    assert len(conv.examples) == 1
    assert conv.dropped == {"empty_answer": 1}


def test_every_row_dropped_is_dataset_empty() -> None:
    with pytest.raises(DatasetError) as info:
        to_examples([{"question": "Q", "answer": ""}], system_prompt="", input_field="prompt")
    assert info.value.code == "dataset_empty"
    assert "empty_answer" in info.value.detail


def test_csv_without_mappable_columns_names_input_field(tmp_path: Path) -> None:
    path = tmp_path / "odd.csv"
    path.write_text("symptom,diagnosis\ncough,cold\n", encoding="utf-8")
    rows = load_rows(section(path))
    with pytest.raises(DatasetError) as info:
        to_examples(rows, system_prompt="", input_field="prompt")
    err = info.value
    assert err.code == "dataset_columns"
    assert err.field == "training_dataset.input_field"
    assert err.status == 422
    assert "diagnosis" in err.detail and "symptom" in err.detail


def test_detect_layout_prefers_messages_then_alpaca_then_qa_then_text() -> None:
    assert detect_layout({"messages": [], "question": "q", "answer": "a"}, "prompt") == "messages"
    assert detect_layout({"instruction": "i", "output": "o", "answer": "a"}, "prompt") == "alpaca"
    assert detect_layout({"question": "q", "answer": "a", "prompt": "p"}, "prompt") == "qa"
    assert detect_layout({"question": "q", "prompt": "p"}, "prompt") == "text"


# --- tokenize (real SmolLM2 tokenizer) --------------------------------------------------------

IM_START, IM_END = 1, 2
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a fever?"},
    {"role": "assistant", "content": "A body temperature above 38 C."},
]


def trained(enc: Any) -> list[int]:
    return [tok for tok, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]


def trained_runs(enc: Any) -> list[list[int]]:
    """Contiguous runs of trained tokens."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for tok, lab in zip(enc.input_ids, enc.labels, strict=True):
        if lab != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(tok)
        previous = lab
    return runs


def test_tokenizer_special_tokens_are_what_the_tests_assume(tokenizer: Any) -> None:
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [IM_START, IM_END]
    assert tokenizer.eos_token_id == IM_END
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    # The template closes every turn with <|im_end|> and a newline.
    assert rendered.endswith("A body temperature above 38 C.<|im_end|>\n")


def test_labels_cover_exactly_the_answer_and_its_end_of_turn(tokenizer: Any) -> None:
    enc = encode(tokenizer, Example(messages=CHAT), max_length=512)
    assert len(enc.input_ids) == len(enc.labels)
    assert not enc.truncated
    # SmolLM2's template writes "<|im_end|>\n" after each turn; the span ends at the
    # end-of-turn token (generation stops there), so the newline after it is not trained.
    assert tokenizer.decode(trained(enc)) == "A body temperature above 38 C.<|im_end|>"
    assert len(trained_runs(enc)) == 1
    # Labels equal the input ids where trained, -100 elsewhere.
    assert all(
        lab in (tok, IGNORE_INDEX) for tok, lab in zip(enc.input_ids, enc.labels, strict=True)
    )
    prompt = [
        tok for tok, lab in zip(enc.input_ids, enc.labels, strict=True) if lab == IGNORE_INDEX
    ]
    assert tokenizer.decode(prompt) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is a fever?<|im_end|>\n"
        "<|im_start|>assistant\n"
        "\n"  # the template's newline after the answer's <|im_end|>
    )
    # One trained block, from the answer's first token to its end-of-turn token.
    first = next(i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
    last = max(i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
    assert all(lab == IGNORE_INDEX for lab in enc.labels[:first])
    assert all(lab != IGNORE_INDEX for lab in enc.labels[first : last + 1])
    assert enc.labels[last] == tokenizer.eos_token_id
    assert all(lab == IGNORE_INDEX for lab in enc.labels[last + 1 :])


def test_eos_is_trained(tokenizer: Any) -> None:
    enc = encode(tokenizer, Example(messages=CHAT), max_length=512)
    assert tokenizer.eos_token_id == 2
    assert 2 in trained(enc)
    assert trained(enc).count(2) == 1


def test_one_im_start_per_message_and_no_bos_added(tokenizer: Any) -> None:
    enc = encode(tokenizer, Example(messages=CHAT), max_length=512)
    assert enc.input_ids.count(IM_START) == len(CHAT)
    assert enc.input_ids[0] == IM_START and enc.input_ids[1] != IM_START
    assert enc.input_ids.count(IM_END) == len(CHAT)


def test_no_bos_even_when_the_tokenizer_adds_one(tokenizer: Any) -> None:
    """SmolLM2's BOS is <|im_start|>; a tokenizer that adds BOS must not double it."""
    bos_adding = copy.deepcopy(tokenizer)
    bos_adding.add_bos_token = True
    assert bos_adding("hi")["input_ids"][0] == bos_adding.bos_token_id == IM_START  # precondition
    enc = encode(bos_adding, Example(messages=CHAT), max_length=512)
    assert enc.input_ids.count(IM_START) == len(CHAT)
    assert enc.input_ids == encode(tokenizer, Example(messages=CHAT), max_length=512).input_ids


def test_default_system_turn_of_the_template_is_not_trained(tokenizer: Any) -> None:
    messages = CHAT[1:]  # no system turn: SmolLM2's template inserts its own
    enc = encode(tokenizer, Example(messages=messages), max_length=512)
    assert enc.input_ids.count(IM_START) == len(messages) + 1
    assert tokenizer.decode(trained(enc)) == "A body temperature above 38 C.<|im_end|>"


def test_multi_turn_trains_both_assistant_turns_only(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a fever?"},
        {"role": "assistant", "content": "A high temperature."},
        {"role": "user", "content": "When should I worry?"},
        {"role": "assistant", "content": "Above 40 C, or for infants."},
    ]
    enc = encode(tokenizer, Example(messages=messages), max_length=512)
    runs = [tokenizer.decode(run) for run in trained_runs(enc)]
    assert runs == ["A high temperature.<|im_end|>", "Above 40 C, or for infants.<|im_end|>"]
    assert trained(enc).count(2) == 2
    assert enc.input_ids.count(IM_START) == len(messages)
    untrained = tokenizer.decode(
        [tok for tok, lab in zip(enc.input_ids, enc.labels, strict=True) if lab == IGNORE_INDEX]
    )
    assert "When should I worry?" in untrained and "What is a fever?" in untrained
    assert "A high temperature." not in untrained


def test_truncation_is_flagged_and_lengths_are_capped(tokenizer: Any) -> None:
    full = encode(tokenizer, Example(messages=CHAT), max_length=512)
    enc = encode(tokenizer, Example(messages=CHAT), max_length=8)
    assert enc.truncated
    assert len(enc.input_ids) == len(enc.labels) == 8
    assert enc.input_ids == full.input_ids[:8]
    assert enc.labels == full.labels[:8]
    # Eight tokens hold only the system turn: nothing is trained.
    assert trained(enc) == []
    exact = encode(tokenizer, Example(messages=CHAT), max_length=len(full.input_ids))
    assert not exact.truncated


def test_text_examples_train_every_token_and_end_with_eos(tokenizer: Any) -> None:
    enc = encode(tokenizer, Example(text="Fever means a high temperature."), max_length=512)
    assert enc.labels == enc.input_ids
    assert enc.input_ids[-1] == tokenizer.eos_token_id
    assert enc.input_ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(enc.input_ids) == "Fever means a high temperature.<|im_end|>"


def test_train_on_prompt_labels_everything(tokenizer: Any) -> None:
    enc = encode(tokenizer, Example(messages=CHAT), max_length=512, train_on_prompt=True)
    assert enc.labels == enc.input_ids


def test_encode_all_stats(tokenizer: Any) -> None:
    rows = load_rows(section("sample:medical_qa", max_samples=5))
    conv = to_examples(rows, system_prompt=RECIPE_SYSTEM_PROMPT, input_field="prompt")
    encoded = encode_all(tokenizer, conv.examples, max_length=64)
    lengths = [len(i.input_ids) for i in encoded.items]
    stats = encoded.stats
    assert stats["examples"] == 5
    assert stats["tokens"] == sum(lengths)
    assert stats["trained_tokens"] == sum(len(trained(i)) for i in encoded.items)
    assert stats["truncated"] == sum(i.truncated for i in encoded.items)
    assert stats["length_max"] == max(lengths) <= 64
    assert 0 < stats["trained_token_share"] < 1
