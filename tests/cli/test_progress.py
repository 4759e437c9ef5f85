"""The job's progress bar (``jobs watch``, ``demo``): one redrawn line on a terminal, plain
lines otherwise, and an ETA that an outage does not inflate."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cli.progress import Progress, StepRate

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def row(step: int, seconds: float, **values: Any) -> dict[str, Any]:
    stamp = (T0 + timedelta(seconds=seconds)).isoformat()
    return {"step": step, "created_at": stamp, "loss": 1.0, "tokens_per_second": 240.0, **values}


def test_an_outage_does_not_count_as_step_time() -> None:
    # 2 s per step, then the server was down 10 minutes between steps 10 and 11.
    rate = StepRate()
    for step in range(1, 11):
        rate.add(row(step, 2.0 * step))
    for step in range(11, 16):
        rate.add(row(step, 20 + 600 + 2.0 * (step - 10)))
    assert rate.seconds_per_step() == pytest.approx(2.0)
    assert rate.gaps == 1
    assert rate.eta(15, 60) == pytest.approx(90.0)  # not "115 s/step, ETA 5m46s"


def test_a_slow_first_interval_is_left_out_once_the_pace_is_known() -> None:
    # Step 0 is the held-out loss before training, logged 90 s before step 1.
    rate = StepRate()
    rate.add(row(0, 0.0))
    for step in range(1, 8):
        rate.add(row(step, 90 + 2.0 * step))
    assert rate.seconds_per_step() == pytest.approx(2.0)


def test_a_resume_that_goes_back_steps_is_not_an_interval() -> None:
    rate = StepRate()
    for step in range(1, 8):
        rate.add(row(step, 3.0 * step))
    # Resumed from the step-5 checkpoint: steps 6.. come again, after a pause.
    for step in range(6, 10):
        rate.add(row(step, 400 + 3.0 * step))
    assert rate.seconds_per_step() == pytest.approx(3.0)


def test_a_slower_pace_still_shows() -> None:
    rate = StepRate(window=3)
    for step in range(1, 6):
        rate.add(row(step, 2.0 * step))
    for step in range(6, 9):  # 4 s per step: slower, not an outage
        rate.add(row(step, 10 + 4.0 * (step - 5)))
    assert rate.seconds_per_step() == pytest.approx(4.0)


def events(bar: Progress) -> None:
    bar.status({"status": "queued", "stage": None, "steps_total": None})
    bar.status({"status": "running", "stage": "training", "steps_total": 4})
    for step in range(1, 5):
        bar.metric(row(step, 2.0 * step))
        # The stream sends a status event with every step (steps_done changes).
        bar.status({"status": "running", "stage": "training", "steps_total": 4, "steps_done": step})
    bar.status({"status": "running", "stage": "exporting", "steps_total": 4})
    bar.status({"status": "succeeded", "stage": None, "steps_total": 4})
    bar.close()


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    events(Progress(out, tty=False))
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[:2] == ["[queued]", "[running / training]"]
    bars = [line for line in lines if "loss" in line]
    assert len(bars) == 4 and all(line.startswith("training [") for line in bars)
    assert "4/4" in bars[-1] and "tok/s" in bars[-1] and "ETA 0s" in bars[-1]
    assert "2.00 s/step" in bars[-1]
    assert lines[-2:] == ["[running / exporting]", "[succeeded]"]
    assert lines.count("[running / training]") == 1


def test_one_line_redrawn_on_a_terminal() -> None:
    out = io.StringIO()
    events(Progress(out, tty=True))
    text = out.getvalue()
    # The bar is redrawn in place (\r, erase line) and the stage change redraws it too.
    assert text.count("\r\x1b[K") == 5
    assert "\r\x1b[Kexporting [" in text
    lines = text.split("\n")
    assert lines[:2] == ["[queued]", "[running / training]"]
    assert lines[2].count("loss") == 5 and lines[3] == "[succeeded]"
