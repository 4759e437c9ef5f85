"""Padding-free packing: every example once, no cross-example attention, no cross-example labels."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from core.data.conversations import to_examples
from core.data.sources import load_rows
from core.data.tokenize import IGNORE_INDEX, Encoded, encode_all
from core.spec import DatasetSection, JobSpec
from core.training.packing import GroupedCollator, PackedCollator, group_by_length, pack


def _items(lengths: list[int]) -> list[Encoded]:
    return [
        Encoded([n * 1000 + i for i in range(n)], [n * 1000 + i for i in range(n)], False)
        for n in lengths
    ]


def test_pack_keeps_every_example_once_within_capacity() -> None:
    items = _items([5, 9, 3, 7, 8, 2, 6])
    rows = pack(items, capacity=12, seed=1)
    assert all(len(r["input_ids"]) <= 12 for r in rows)
    assert sorted(n for r in rows for n in r["seq_lengths"]) == [2, 3, 5, 6, 7, 8, 9]
    assert sum(len(r["input_ids"]) for r in rows) == sum([5, 9, 3, 7, 8, 2, 6])
    for row in rows:
        starts, offset = [], 0
        for n in row["seq_lengths"]:
            assert row["position_ids"][offset : offset + n] == list(range(n))
            starts.append(offset)
            offset += n
        # No example's first token is a target: nothing learns to predict the next example.
        assert all(row["labels"][s] == IGNORE_INDEX for s in starts)
    assert pack(items, capacity=12, seed=1) == rows  # seed-stable


def test_packed_row_attends_only_within_each_example(model_dir: Path, tokenizer: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = [
        "What is anemia?",
        "Hypertension means high blood pressure in the arteries.",
        "Drink water.",
    ]
    items = [Encoded(tokenizer(t)["input_ids"], tokenizer(t)["input_ids"], False) for t in texts]
    (row,) = pack(items, capacity=1000, seed=0)
    batch = PackedCollator()([row])
    with torch.no_grad():
        # As in training: no KV cache (with one, transformers skips packed-sequence masking).
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits[0]
        offset = 0
        for n in row["seq_lengths"]:
            ids = torch.tensor([row["input_ids"][offset : offset + n]])
            alone = model(input_ids=ids, use_cache=False).logits[0]
            assert torch.allclose(packed[offset : offset + n], alone, atol=1e-4), offset
            offset += n


def test_length_groups_hold_every_example_once_within_padded_capacity() -> None:
    lengths = [5, 9, 3, 7, 8, 2, 6, 9, 4]
    groups = group_by_length(_items(lengths), capacity=20, seed=3)
    widths = [[len(r) for r in g["input_ids"]] for g in groups]
    assert sorted(n for w in widths for n in w) == sorted(lengths)
    assert all(max(w) * len(w) <= 20 for w in widths)  # padded size within the budget
    assert all(w == sorted(w) for w in widths)  # neighbours in length share a batch
    batch = GroupedCollator(pad_id=0)([groups[0]])
    assert "attention_mask" not in batch  # right padding + causal attention needs none
    assert batch["_real_tokens"] == sum(widths[0]) and batch["_samples"] == len(widths[0])
    pads = batch["input_ids"] == 0  # real ids here are >= 2000
    assert int(pads.sum()) == batch["input_ids"].numel() - batch["_real_tokens"] > 0
    assert (batch["labels"][pads] == IGNORE_INDEX).all()


def test_right_padding_without_mask_leaves_real_logits_unchanged(
    model_dir: Path, tokenizer: Any
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    short, long = (
        tokenizer("Drink water.")["input_ids"],
        tokenizer("What is anemia? Tell me.")["input_ids"],
    )
    items = [Encoded(short, short, False), Encoded(long, long, False)]
    (group,) = group_by_length(items, capacity=1000, seed=0)
    batch = GroupedCollator(pad_id=0)([group])
    with torch.no_grad():
        dense = model(input_ids=batch["input_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([short]), use_cache=False).logits
    row = [len(r) for r in group["input_ids"]].index(len(short))
    assert torch.allclose(dense[row, : len(short)], alone[0], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["padding_free", "length_grouped"])
def test_packed_training_runs_and_counts_real_tokens(model_dir: Path, mode: str) -> None:
    from core.training import engines, trainer
    from core.training.sink import ListSink

    spec = JobSpec.model_validate(
        {
            "model_config": {
                "base_model": str(model_dir),
                "max_seq_length": 256,
                "load_in_4bit": False,
            },
            "lora_config": {"use_gradient_checkpointing": False},
            "training_config": {
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 1,
                "max_steps": 2,
                "packing": True,
                "packing_mode": mode,
                "optim": "adamw_torch",
            },
        }
    )
    loaded = engines.load(spec, str(model_dir))
    rows = load_rows(DatasetSection(name="sample:medical_qa", max_samples=16))
    examples = to_examples(rows, system_prompt="Be brief.", input_field="prompt").examples
    encoded = encode_all(loaded.tokenizer, examples, max_length=256)
    sink = ListSink()
    outcome = trainer.train(spec, loaded, encoded.items, output_dir=Path("/tmp/unused"), sink=sink)
    assert outcome.steps == 2 and len(sink.rows) == 2
    assert loaded.model.config.use_cache is False  # a KV cache would disable packed masking
    assert all(math.isfinite(r["loss"]) for r in sink.rows)
    # Each step trains a packed row of up to 2 x 256 tokens holding several whole examples.
    assert all(r["samples_per_second"] > r["tokens_per_second"] / 512 for r in sink.rows)
