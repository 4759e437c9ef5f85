"""The gate: each failure triggered by a crafted bad dataset; stats of a good one."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from core.data.gate import DatasetGateError
from core.data.prepare import prepare, render_dataset
from core.data.tokenize import IGNORE_INDEX
from core.pipeline import _prepare_data
from core.spec import DatasetSection, JobSpec
from tests.helpers import unrepeated_words

QA = [
    {"question": "What is a fever?", "answer": "A body temperature above 38 C."},
    {"question": "What lowers a fever?", "answer": "Paracetamol or ibuprofen, and fluids."},
    {"question": "Is a fever dangerous?", "answer": "Rarely; very high fevers need care."},
    {"question": "What is anemia?", "answer": "Too few red blood cells."},
]


def jsonl(tmp_path: Path, rows: list[dict[str, Any]], name: str = "qa.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def gate_error(section: DatasetSection, tokenizer: Any, max_seq_length: int = 512) -> Any:
    with pytest.raises(DatasetGateError) as info:
        prepare(section, tokenizer, max_seq_length=max_seq_length)
    return info.value


def test_text_carrying_the_bos_string_is_bos_repeated(tmp_path: Path, real: Any) -> None:
    rows = copy.deepcopy(QA)
    rows[2]["question"] = "<|begin_of_text|>Is a fever dangerous?"
    err = gate_error(
        DatasetSection(min_examples=1, name=str(jsonl(tmp_path, rows))), real["llama3"]
    )
    assert err.code == "bos_repeated"
    assert err.example_index == 2
    assert "example 2 (row 2)" in err.detail and "2 BOS" in err.detail
    assert err.status == 422


def test_template_without_bos_for_a_bos_model_is_bos_missing(tmp_path: Path, real: Any) -> None:
    tok = copy.deepcopy(real["mistral_v2"])  # adds <s> by default; ChatML never writes it
    section = DatasetSection(min_examples=1, name=str(jsonl(tmp_path, QA)), chat_template="chatml")
    err = gate_error(section, tok)
    assert err.code == "bos_missing" and err.example_index == 0
    assert "chat_template" in err.detail


PLAIN = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
# Closes each turn at the start of the next one: the first answer's end-of-turn token lands
# outside its span (masked), the last answer has none at all.
CLOSES_LATE = (
    "{% for m in messages %}{% if not loop.first %}{{ eos_token }}{% endif %}"
    "{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ eos_token + 'assistant: ' }}{% endif %}"
)


def test_template_without_end_of_turn_is_eot_missing(tmp_path: Path, tokenizer: Any) -> None:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = PLAIN
    err = gate_error(DatasetSection(min_examples=1, name=str(jsonl(tmp_path, QA))), tok)
    assert err.code == "eot_missing" and err.example_index == 0
    assert err.field == "training_dataset.chat_template"
    assert "<|im_end|>" in err.detail


def test_end_of_turn_outside_the_answer_span_is_eot_not_trained(
    tmp_path: Path, tokenizer: Any
) -> None:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CLOSES_LATE
    chat = [
        {"role": "user", "content": "What is a fever?"},
        {"role": "assistant", "content": "A high temperature."},
        {"role": "user", "content": "When is it serious?"},
        {"role": "assistant", "content": "Above 40 C."},
    ]
    path = jsonl(tmp_path, [{"messages": chat}])
    err = gate_error(DatasetSection(min_examples=1, name=str(path), system_prompt=""), tok)
    assert err.code == "eot_not_trained" and err.example_index == 0
    assert "answer 0" in err.detail


def test_nothing_trained_is_no_trained_tokens(tmp_path: Path, tokenizer: Any) -> None:
    section = DatasetSection(min_examples=1, name=str(jsonl(tmp_path, QA)), max_truncated_share=1.0)
    err = gate_error(section, tokenizer, max_seq_length=16)  # the system turn alone fills it
    assert err.code == "no_trained_tokens"


def test_too_many_truncated_names_the_first(tmp_path: Path, tokenizer: Any) -> None:
    rows = copy.deepcopy(QA)
    rows[1]["answer"] = unrepeated_words(200, "paracetamol")
    rows[3]["answer"] = unrepeated_words(200, "cells")
    section = DatasetSection(min_examples=1, name=str(jsonl(tmp_path, rows)))
    err = gate_error(section, tokenizer, max_seq_length=128)
    assert err.code == "too_many_truncated" and err.example_index == 1
    assert "2 of 4" in err.detail and "max_seq_length 128" in err.detail
    assert err.field == "model_config.max_seq_length"
    # Allowed share: passes, and the truncation rate is reported.
    ok = prepare(
        section.model_copy(update={"max_truncated_share": 0.5}), tokenizer, max_seq_length=128
    )
    assert ok.stats["truncated"] == 2 and ok.stats["truncation_rate"] == 0.5
    # max_tokens drops the long ones instead of truncating them.
    dropped = prepare(section.model_copy(update={"max_tokens": 128}), tokenizer, max_seq_length=128)
    assert dropped.stats["examples"] == 2 and dropped.stats["truncated"] == 0
    assert dropped.stats["dropped"]["longer_than_max_tokens"] == 2


def test_a_job_fails_with_the_gate_code(tmp_path: Path, model_dir: Path) -> None:
    rows = copy.deepcopy(QA)
    rows[0]["answer"] = unrepeated_words(400, "long")
    spec = JobSpec.model_validate(
        {
            "model_config": {"base_model": "smollm2-135m-instruct", "max_seq_length": 64},
            "training_dataset": {"name": str(jsonl(tmp_path, rows))},
        }
    )
    with pytest.raises(DatasetGateError) as info:
        _prepare_data(spec, str(model_dir))
    assert info.value.code == "too_many_truncated"


def test_good_dataset_stats(tmp_path: Path, tokenizer: Any) -> None:
    rows = [*QA, QA[0], {"question": "What is anemia ", "answer": "too few red blood cells"}]
    rows.append({"question": "Empty?", "answer": "  "})
    section = DatasetSection(min_examples=1, name=str(jsonl(tmp_path, rows)), validation_share=0.25)
    prepared = prepare(section, tokenizer, max_seq_length=512)
    stats = prepared.stats
    assert stats["rows"] == 7
    assert stats["dropped"] == {"duplicate_exact": 1, "duplicate_normalized": 1, "empty_answer": 1}
    assert stats["examples"] == len(prepared.train) == 3
    assert stats["validation_examples"] == len(prepared.validation) == 1
    assert stats["by_source"] == {str(tmp_path / "qa.jsonl"): 3}
    lengths = sorted(len(i.input_ids) for i in prepared.train)
    assert stats["length_p50"] == lengths[1] and stats["length_max"] == lengths[-1]
    assert stats["length_p50"] <= stats["length_p90"] <= stats["length_p99"] <= stats["length_max"]
    trained = sum(1 for i in prepared.train for lab in i.labels if lab != IGNORE_INDEX)
    assert stats["trained_tokens"] == trained
    assert stats["trained_token_share"] == round(trained / stats["tokens"], 4)
    assert stats["truncation_rate"] == 0.0
    assert stats["chat_template"] == "tokenizer" and stats["layout"] == "qa"
    json.dumps(stats)  # stored in a JSON column


def test_medquad_stats_count_sources_and_question_types(tmp_path: Path, tokenizer: Any) -> None:
    from tests.core.data.test_data_sources import DOC, medquad_folder

    folder = medquad_folder(tmp_path, {"A/1.xml": DOC})
    prepared = prepare(
        DatasetSection(min_examples=1, name=f"{folder}/"), tokenizer, max_seq_length=512
    )
    assert prepared.stats["format"] == "medquad"
    assert prepared.stats["by_source"] == {"TEST": 2}
    assert prepared.stats["by_qtype"] == {"information": 1, "causes": 1}
    assert prepared.stats["dropped"] == {"medquad_no_answer": 1}


def test_render_dataset_limit_renders_only_the_first(tmp_path: Path, tokenizer: Any) -> None:
    rendered = render_dataset(
        DatasetSection(min_examples=1, name=str(jsonl(tmp_path, QA))),
        tokenizer,
        max_seq_length=512,
        limit=2,
    )
    assert len(rendered.items) == len(rendered.examples) == 2
