"""Padding-free packing: several short examples share one row, attention stays inside each.

Medical answers are short, so padded batches spend much of their compute on padding. A packed
row concatenates examples; ``position_ids`` restart at each example, which is how both
transformers (block-diagonal mask built from the position ids) and Unsloth (varlen attention
from ``packed_seq_lengths``) know where one example ends. The first label of every example is
ignored, so no token learns to predict the next example.
"""

from __future__ import annotations

import random
from typing import Any

from core.data.tokenize import IGNORE_INDEX, Encoded


def pack(items: list[Encoded], *, capacity: int, seed: int) -> list[dict[str, list[int]]]:
    """Group examples (in a seed-stable shuffled order) into rows of at most ``capacity`` tokens."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    rows: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = _empty()
    for index in order:
        item = items[index]
        length = len(item.input_ids)
        if current["input_ids"] and len(current["input_ids"]) + length > capacity:
            rows.append(current)
            current = _empty()
        current["input_ids"] += item.input_ids
        current["labels"] += [IGNORE_INDEX, *item.labels[1:]]
        current["position_ids"] += list(range(length))
        current["seq_lengths"].append(length)
    if current["input_ids"]:
        rows.append(current)
    return rows


def _empty() -> dict[str, list[int]]:
    return {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": []}


class PackedCollator:
    """One packed row per micro-batch, no padding and no attention mask.

    ``packed_seq_lengths`` is what Unsloth reads; transformers derives the same boundaries from
    ``position_ids``, so the trainer drops the key before a transformers model sees it.
    """

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        (row,) = batch
        out = {
            "input_ids": torch.tensor([row["input_ids"]]),
            "labels": torch.tensor([row["labels"]]),
            "position_ids": torch.tensor([row["position_ids"]]),
            "packed_seq_lengths": torch.tensor(row["seq_lengths"], dtype=torch.int32),
        }
        return out
