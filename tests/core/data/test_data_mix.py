"""Dataset mixes: several sources with weights, a seeded draw, per-source statistics."""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from core.data.gate import DatasetGateError
from core.data.mix import MixTooSmall, collect, draw, plan
from core.data.prepare import prepare
from core.data.sources import resolve_local
from core.errors import DatasetError, DatasetNotFound
from core.spec import DatasetSection, JobSpec


def qa_file(path: Path, prefix: str, count: int, **extra: Any) -> Path:
    rows = [
        {"question": f"{prefix} question number {i}?", "answer": f"{prefix} answer {i}.", **extra}
        for i in range(count)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def mix(*sources: dict[str, Any], **options: Any) -> DatasetSection:
    return DatasetSection.model_validate({"sources": list(sources), **options})


def texts(section: DatasetSection) -> list[str]:
    return [e.messages[1]["content"] for e in collect(section).examples if e.messages]


# --- the spec ---------------------------------------------------------------------------------


def error_locs(data: dict[str, Any]) -> list[tuple[Any, ...]]:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate({"training_dataset": data})
    return [e["loc"] for e in info.value.errors()]


def test_spec_names_the_field_at_fault() -> None:
    good = {"name": "sample:medical_qa"}
    assert error_locs({"sources": [good, {"name": "a.jsonl", "weight": 0}]}) == [
        ("training_dataset", "sources", 1, "weight")
    ]
    assert error_locs({"sources": [good, {"name": "a.jsonl", "weight": -2}]}) == [
        ("training_dataset", "sources", 1, "weight")
    ]
    assert error_locs({"sources": [{"name": "a.jsonl", "weight": "inf"}]}) == [
        ("training_dataset", "sources", 0, "weight")
    ]
    assert error_locs({"sources": []}) == [("training_dataset", "sources")]
    assert error_locs({"sources": [good, {"name": "no such name"}]}) == [
        ("training_dataset", "sources", 1, "name")
    ]
    assert error_locs({"sources": [{"weight": 1}]}) == [("training_dataset", "sources", 0, "name")]
    assert error_locs({"sources": [{"name": "a.jsonl", "epochs": 2}]}) == [
        ("training_dataset", "sources", 0, "epochs")
    ]


def test_single_source_fields_beside_sources_are_refused() -> None:
    with pytest.raises(ValidationError, match="name, max_samples cannot be set beside sources"):
        mix({"name": "a.jsonl"}, name="b.jsonl", max_samples=3)
    with pytest.raises(ValidationError, match="apply only with sources"):
        DatasetSection(name="a.jsonl", mix_size=10)


def test_a_stored_mix_spec_validates_again() -> None:
    spec = JobSpec.model_validate(
        {"training_dataset": {"sources": [{"name": "a.jsonl", "weight": 3}], "mix_size": 9}}
    )
    again = JobSpec.model_validate(json.loads(json.dumps(spec.to_json())))
    assert again.dataset.sources == spec.dataset.sources and again.dataset.mix_size == 9


# --- the draw ---------------------------------------------------------------------------------


def test_plan_default_size_is_the_largest_mix_without_repeats() -> None:
    # 3:1 with 100 and 10 examples: the small source limits the mix to 40 (30 + 10).
    assert plan([100, 10], [3, 1], size=None, oversample=False) == [30, 10]
    assert plan([30, 100], [3, 1], size=None, oversample=False) == [30, 10]
    assert plan([7, 7, 7], [1, 1, 1], size=None, oversample=False) == [7, 7, 7]
    # Largest remainder: the shares add up to the size exactly.
    assert sum(plan([50, 50, 50], [1, 1, 1], size=100, oversample=False)) == 100
    for _ in range(200):
        rng = random.Random(_)
        available = [rng.randint(1, 500) for _ in range(rng.randint(1, 5))]
        weights = [rng.uniform(0.01, 10) for _ in available]
        counts = plan(available, weights, size=None, oversample=False)
        assert all(c <= n for c, n in zip(counts, available, strict=True))


def test_plan_refuses_a_source_too_small_for_its_share_unless_oversampling() -> None:
    with pytest.raises(MixTooSmall) as info:
        plan([100, 10], [1, 1], size=60, oversample=False)
    assert info.value.field == "training_dataset.mix_size"
    assert info.value.code == "dataset_mix_too_small"
    assert "source 1 has 10 examples" in info.value.detail and "at most 20" in info.value.detail
    assert plan([100, 10], [1, 1], size=60, oversample=True) == [30, 30]


def test_draw_is_without_replacement_then_whole_passes() -> None:
    items = list(range(10))
    taken = draw(items, 7, random.Random(1))  # type: ignore[arg-type]
    assert len(set(taken)) == 7
    repeated = Counter(draw(items, 25, random.Random(1)))  # type: ignore[arg-type]
    assert sorted(repeated.values()) == [2] * 5 + [3] * 5


def test_mix_takes_each_share_and_is_seed_stable(tmp_path: Path) -> None:
    a = qa_file(tmp_path / "a.jsonl", "alpha", 60)
    b = qa_file(tmp_path / "b.jsonl", "beta", 20)
    section = mix({"name": str(a), "weight": 1}, {"name": str(b), "weight": 1}, mix_size=30)
    collected = collect(section)
    assert [p.taken for p in collected.parts] == [15, 15]
    drawn = texts(section)
    assert Counter(t.split()[0] for t in drawn) == {"alpha": 15, "beta": 15}
    assert len(set(drawn)) == 30  # no example twice
    assert drawn == texts(section)  # the same spec draws the same examples, in the same order
    other = texts(section.model_copy(update={"mix_seed": 7}))
    assert other != drawn and Counter(t.split()[0] for t in other) == {"alpha": 15, "beta": 15}
    # Sources interleave: the first ten are not all from one source.
    assert len({t.split()[0] for t in drawn[:10]}) == 2
    meta = collected.examples[0].meta
    assert meta["dataset"] in (str(a), str(b)) and meta["dataset_index"] in (0, 1)


def test_default_size_keeps_the_weights(tmp_path: Path) -> None:
    a = qa_file(tmp_path / "a.jsonl", "alpha", 100)
    b = qa_file(tmp_path / "b.jsonl", "beta", 10)
    collected = collect(mix({"name": str(a), "weight": 3}, {"name": str(b), "weight": 1}))
    assert [p.taken for p in collected.parts] == [30, 10]
    assert len(collected.examples) == 40


def test_oversampling_repeats_the_small_source(tmp_path: Path) -> None:
    a = qa_file(tmp_path / "a.jsonl", "alpha", 40)
    b = qa_file(tmp_path / "b.jsonl", "beta", 4)
    section = mix({"name": str(a)}, {"name": str(b)}, mix_size=20)
    with pytest.raises(MixTooSmall) as info:
        collect(section)
    stats = info.value.dataset_stats
    assert stats is not None and [s["cleaned"] for s in stats["sources"]] == [40, 4]
    collected = collect(section.model_copy(update={"mix_oversample": True}))
    beta = Counter(
        t for t in texts(section.model_copy(update={"mix_oversample": True})) if "beta" in t
    )
    assert sorted(beta.values()) == [2, 2, 3, 3]  # 10 from 4: two whole passes, then 2 more
    assert collected.summaries()[1]["repeated"] == 6


def test_duplicates_across_sources_count_against_the_later_one(tmp_path: Path) -> None:
    a = qa_file(tmp_path / "a.jsonl", "alpha", 10)
    b = tmp_path / "b.jsonl"
    rows = [json.loads(line) for line in a.read_text().splitlines()[:3]]
    rows += [{"question": f"beta {i}?", "answer": f"b {i}."} for i in range(5)]
    b.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    collected = collect(mix({"name": str(a)}, {"name": str(b)}))
    assert collected.parts[0].dropped == {}
    assert collected.parts[1].dropped == {"duplicate_exact": 3}
    assert [len(p.examples) for p in collected.parts] == [10, 5]


def test_sources_keep_their_own_column_mapping(tmp_path: Path) -> None:
    a = qa_file(tmp_path / "a.jsonl", "alpha", 4)
    b = tmp_path / "b.csv"
    b.write_text("Q,A,junk\nWhat is beta?,Beta is a letter.,x\nAnd gamma?,Also a letter.,y\n")
    section = mix(
        {"name": str(a), "weight": 2},
        {"name": str(b), "columns": {"question": "Q", "answer": "A"}, "remove_columns": ["junk"]},
    )
    collected = collect(section)
    assert [p.taken for p in collected.parts] == [4, 2]
    assert "What is beta?" in texts(section)


def test_errors_name_the_source(tmp_path: Path) -> None:
    a = qa_file(tmp_path / "a.jsonl", "alpha", 4)
    b = tmp_path / "b.csv"
    b.write_text("Q,A\nq,a\n")
    bad_column = mix(
        {"name": str(a)}, {"name": str(b), "columns": {"question": "X", "answer": "A"}}
    )
    with pytest.raises(DatasetError) as info:
        collect(bad_column)
    assert info.value.field == "training_dataset.sources[1].columns.question"
    assert info.value.detail.startswith(f"source 1 ({str(b)!r}): ")
    missing = mix({"name": str(a)}, {"name": str(tmp_path / "nowhere.jsonl")})
    with pytest.raises(DatasetNotFound) as found:
        resolve_local(missing)  # what the API runs at submit time
    assert found.value.field == "training_dataset.sources[1].name"
    no_rows = tmp_path / "c.jsonl"
    no_rows.write_text('{"question": "q?", "answer": " "}\n')
    with pytest.raises(DatasetError) as empty:
        collect(mix({"name": str(a)}, {"name": str(no_rows)}))
    assert empty.value.code == "dataset_empty"
    assert empty.value.field == "training_dataset.sources[1]"


# --- statistics -------------------------------------------------------------------------------


def test_mix_statistics_count_by_source(tmp_path: Path, tokenizer: Any) -> None:
    a = qa_file(tmp_path / "a.jsonl", "alpha", 30)
    b = tmp_path / "b.jsonl"
    b_rows = [{"question": f"beta {i}?", "answer": f"b {i}."} for i in range(12)]
    b_rows += [{"question": "empty?", "answer": ""}, b_rows[0]]
    b.write_text("\n".join(json.dumps(r) for r in b_rows), encoding="utf-8")
    section = mix(
        {"name": str(a), "weight": 2},
        {"name": str(b), "weight": 1},
        validation_share=0.2,
    )
    prepared = prepare(section, tokenizer, max_seq_length=256)
    stats = prepared.stats
    assert stats["source"] == "mix" and stats["rows"] == 44
    first, second = stats["sources"]
    assert (first["name"], first["weight"], first["share"]) == (str(a), 2.0, 0.6667)
    assert (first["rows"], first["cleaned"], first["taken"]) == (30, 30, 24)
    assert (second["rows"], second["cleaned"], second["taken"]) == (14, 12, 12)
    assert second["dropped"] == {"empty_answer": 1, "duplicate_exact": 1}
    assert stats["dropped"] == {"empty_answer": 1, "duplicate_exact": 1}
    assert first["examples"] + second["examples"] == stats["examples"] == len(prepared.train)
    assert first["validation_examples"] + second["validation_examples"] == len(prepared.validation)
    assert len(prepared.train) + len(prepared.validation) == 36
    assert stats["by_source"] == {str(a): first["examples"], str(b): second["examples"]}
    assert stats["gate"] == {"passed": True, "problem_count": 0, "problems": []}
    json.dumps(stats)


def test_single_source_statistics_list_the_one_source(tmp_path: Path, tokenizer: Any) -> None:
    a = qa_file(tmp_path / "a.jsonl", "alpha", 5)
    stats = prepare(
        DatasetSection(name=str(a), min_examples=1), tokenizer, max_seq_length=256
    ).stats
    assert stats["source"] == str(a)
    assert [
        (s["name"], s["rows"], s["cleaned"], s["taken"], s["examples"]) for s in stats["sources"]
    ] == [(str(a), 5, 5, 5, 5)]


def test_a_gate_failure_carries_the_statistics(tmp_path: Path, tokenizer: Any) -> None:
    a = qa_file(tmp_path / "a.jsonl", "alpha", 3)
    b = qa_file(tmp_path / "b.jsonl", "beta", 3)
    section = mix({"name": str(a)}, {"name": str(b)}, chat_template="llama3")
    with pytest.raises(DatasetGateError) as info:
        # A copy: the llama3 choice replaces the shared tokenizer's template.
        prepare(section, copy.deepcopy(tokenizer), max_seq_length=256)  # <|eot_id|>: plain text
    stats = info.value.dataset_stats
    assert info.value.code == "eot_missing" and stats is not None
    assert stats["gate"]["passed"] is False
    assert stats["gate"]["problem_count"] == 6  # every example, each named
    assert {p["code"] for p in stats["gate"]["problems"]} == {"eot_missing"}
    assert stats["examples"] == 6 and [s["taken"] for s in stats["sources"]] == [3, 3]
    assert "source " in info.value.detail  # the example is named with its source
    json.dumps(stats)
