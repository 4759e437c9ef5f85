"""`medtune jobs metrics` for a dpo / orpo job: the reward margin and accuracy columns."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from cli.jobs import cmd_metrics


class OnePage:
    """A client whose job has the given metric rows (one page)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def metrics(self, job_id: str, *, after_step: int | None, limit: int) -> dict[str, Any]:
        return {"data": self.rows, "has_more": False, "last_step": 2, "status": "running"}


def lines(rows: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> list[str]:
    args = argparse.Namespace(job_id="job_x", after_step=None, limit=100, all=False, json=False)
    assert cmd_metrics(args, OnePage(rows)) == 0  # type: ignore[arg-type]
    return capsys.readouterr().out.splitlines()


def test_a_preference_job_shows_margin_and_accuracy(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        {"step": 1, "loss": 0.6931, "rewards_margin": 0.0, "rewards_accuracy": 0.0},
        {"step": 2, "loss": 0.4, "rewards_margin": 0.6639, "rewards_accuracy": 1.0},
    ]
    header, *body = lines(rows, capsys)
    assert header.split()[-2:] == ["MARGIN", "ACC"]
    assert body[-1].split()[-2:] == ["0.664", "1.00"]


def test_an_sft_job_has_no_reward_columns(capsys: pytest.CaptureFixture[str]) -> None:
    header, _ = lines([{"step": 1, "loss": 2.0}], capsys)
    assert "MARGIN" not in header and header.split()[-1] == "PEAK_MB"
