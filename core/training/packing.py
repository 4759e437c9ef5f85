"""Batching short examples without wasting compute on padding, attention kept inside each.

Medical answers are short, so batches padded to max_seq_length spend most of their compute on
padding. Two ways out, each filling a micro-batch with up to batch x max_seq_length tokens:

- ``padding_free``: one row concatenates examples; ``position_ids`` restart at each example,
  which is how transformers (block-diagonal mask built from the position ids) and Unsloth
  (varlen attention from ``packed_seq_lengths``) know where one example ends. The first label
  of every example is ignored, so no token learns to predict the next example.
- ``length_grouped``: examples of similar length share a dense micro-batch, right-padded to the
  longest. Causal attention alone keeps them apart (a token never sees later positions, so it
  never sees padding), so no attention mask is sent and the fast causal kernels run.
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
            "_real_tokens": len(row["input_ids"]),
            "_samples": len(row["seq_lengths"]),
        }
        return out


def group_by_length(
    items: list[Encoded], *, capacity: int, seed: int
) -> list[dict[str, list[list[int]]]]:
    """Micro-batches of similar-length examples, each at most ``capacity`` padded tokens."""
    rng = random.Random(seed)
    order = sorted(range(len(items)), key=lambda i: (len(items[i].input_ids), rng.random()))
    groups: list[list[int]] = []
    current: list[int] = []
    for index in order:  # ascending length: the newest member is the longest
        width = len(items[index].input_ids)
        if current and width * (len(current) + 1) > capacity:
            groups.append(current)
            current = []
        current.append(index)
    if current:
        groups.append(current)
    rng.shuffle(groups)  # lengths sorted within a batch, not across the epoch
    return [
        {"input_ids": [items[i].input_ids for i in g], "labels": [items[i].labels for i in g]}
        for g in groups
    ]


class GroupedCollator:
    """One length group per micro-batch, right-padded, without an attention mask."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[list[int]]]]) -> dict[str, Any]:
        import torch

        (group,) = batch
        width = max(len(ids) for ids in group["input_ids"])
        ids = [row + [self.pad_id] * (width - len(row)) for row in group["input_ids"]]
        labels = [row + [IGNORE_INDEX] * (width - len(row)) for row in group["labels"]]
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            # Read by the trainer's token counter and removed before the model sees the batch.
            "_real_tokens": sum(len(row) for row in group["input_ids"]),
            "_samples": len(group["input_ids"]),
        }
