"""Rows a reader cannot read: counted by reason and skipped, or failing the job.

Readers (core.data.sources) yield a ``BadRow`` where a row cannot be read; the policy is the
dataset section's ``on_bad_rows`` and ``max_bad_row_share``. MedQuAD counts whole files the same
way (core.data.medquad).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from core.errors import DatasetError
from core.spec import DatasetSection

Row = dict[str, Any]


class TooManyBadRows(DatasetError):
    """More of a dataset's rows are unreadable than max_bad_row_share allows."""

    code = "dataset_bad_rows"

    def __init__(self, detail: str, *, field: str) -> None:
        super().__init__(detail, field=field)
        self.dataset_stats: dict[str, Any] | None = None


@dataclass
class BadRow:
    """A row a reader could not read: the reason it is counted under in the dataset stats, and
    the error it raises with on_bad_rows 'fail' (or when no row at all is readable)."""

    reason: str
    error: DatasetError


def good_rows(
    items: Iterable[Row | BadRow], section: DatasetSection
) -> tuple[list[Row], Counter[str], DatasetError | None]:
    """The readable rows, the unreadable ones counted by reason, and the first one's error."""
    rows: list[Row] = []
    bad: Counter[str] = Counter()
    first: DatasetError | None = None
    for item in items:
        if not isinstance(item, BadRow):
            rows.append(item)
            continue
        if section.on_bad_rows == "fail":
            raise item.error
        bad[item.reason] += 1
        first = first or item.error
    return rows, bad, first


def check_bad_share(
    bad: Counter[str],
    *,
    good: int,
    first: DatasetError | None,
    section: DatasetSection,
    unit: str = "rows",
) -> None:
    """Fail when nothing is readable (with the first row's own error) or when the unreadable
    share passes max_bad_row_share (dataset_bad_rows); below it the bad rows are only counted."""
    count = sum(bad.values())
    if not count or first is None:
        return
    if good == 0:
        raise first
    if count / (good + count) > section.max_bad_row_share:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in bad.most_common())
        error = TooManyBadRows(
            f"{count} of {good + count} {unit} cannot be read ({reasons}), more than "
            f"training_dataset.max_bad_row_share ({section.max_bad_row_share:g}) allows; the "
            f"first: {first.detail}. Fix the data, or raise max_bad_row_share to train on the "
            "readable rows",
            field="training_dataset.name",
        )
        # Stored on the failed job (core.pipeline), so GET /jobs/{id}/dataset shows the counts.
        error.dataset_stats = {"rows": good + count, "dropped": dict(bad.most_common())}
        raise error
