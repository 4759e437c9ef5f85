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

Unpacked jobs (``packing: false``) keep the recipe's optimizer steps, each of exactly
batch x accumulation examples, but ``step_rows`` lays every step out as padding-free rows:
usually one row for the whole step instead of ``accumulation`` padded micro-batches, so a step
launches its kernels once. The loss is the same (the trainer normalises by the trained tokens of
the whole step either way); a short GPU step is bound by kernel launches, not arithmetic.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from core.data.tokenize import IGNORE_INDEX, Encoded


def pack(items: list[Encoded], *, capacity: int, seed: int) -> list[dict[str, list[int]]]:
    """Group examples (in a seed-stable shuffled order) into rows of at most ``capacity`` tokens."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [_row(items, group) for group in _fill(items, order, capacity=capacity)]


def _fill(items: list[Encoded], order: list[int], *, capacity: int) -> list[list[int]]:
    """Consecutive runs of ``order`` whose tokens fit in ``capacity`` (a lone example may not)."""
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index in order:
        length = len(items[index].input_ids)
        if current and used + length > capacity:
            groups.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        groups.append(current)
    return groups


def _row(items: list[Encoded], indices: list[int]) -> dict[str, list[int]]:
    """One padding-free row; each example's first label is ignored (it would be predicted from
    the previous example's last token, and an unpacked example's first label is never a target)."""
    row: dict[str, list[int]] = {k: [] for k in ("input_ids", "labels", "position_ids")}
    row["seq_lengths"] = []
    for index in indices:
        item = items[index]
        row["input_ids"] += item.input_ids
        row["labels"] += [IGNORE_INDEX, *item.labels[1:]]
        row["position_ids"] += list(range(len(item.input_ids)))
        row["seq_lengths"].append(len(item.input_ids))
    return row


def step_rows(
    items: list[Encoded], *, examples_per_step: int, capacity: int, seed: int
) -> tuple[list[dict[str, list[int]]], int]:
    """The recipe's optimizer steps (``examples_per_step`` examples each, a seed-stable shuffle)
    as padding-free rows of at most ``capacity`` tokens, and how many rows each step takes.

    Every step takes the same number of rows, as gradient accumulation needs: a step that fits
    in fewer is split further (by examples, so no row grows). Only the last step of the epoch
    may hold fewer examples than rows; it takes one row per example and stays last.
    """
    steps = _steps(len(items), examples_per_step=examples_per_step, seed=seed)
    layouts = [_fill(items, step, capacity=capacity) for step in steps]
    per_step = max((len(groups) for groups in layouts), default=1)
    rows: list[dict[str, list[int]]] = []
    for groups in layouts:
        while len(groups) < per_step and any(len(g) > 1 for g in groups):
            widest = max(range(len(groups)), key=lambda i: len(groups[i]))
            group = groups.pop(widest)
            half = len(group) // 2
            groups[widest:widest] = [group[:half], group[half:]]
        rows += [_row(items, group) for group in groups]
    return rows, per_step


def _steps(count: int, *, examples_per_step: int, seed: int) -> list[list[int]]:
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return [order[i : i + examples_per_step] for i in range(0, count, examples_per_step)]


def largest_step(items: list[Encoded], *, examples_per_step: int, seed: int) -> int:
    """The tokens of the fullest step ``step_rows`` would lay out with the same arguments."""
    steps = _steps(len(items), examples_per_step=examples_per_step, seed=seed)
    return max((sum(len(items[i].input_ids) for i in step) for step in steps), default=0)


class StepSampler:
    """Visits the steps of ``step_rows`` in a new seed-stable order each epoch, each step's rows
    together and in order (the Trainer accumulates consecutive micro-batches into one step)."""

    def __init__(self, num_rows: int, *, rows_per_step: int, seed: int) -> None:
        self.num_rows = num_rows
        self.rows_per_step = rows_per_step
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self) -> Iterator[int]:
        k = self.rows_per_step
        full = self.num_rows // k
        steps = list(range(full))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(steps)
        for step in steps:
            yield from range(step * k, step * k + k)
        yield from range(full * k, self.num_rows)  # a short last step stays last


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
