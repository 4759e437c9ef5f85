"""One progress bar for a training job: stage, step/total, loss, tokens/s and ETA.

On a terminal it is one line redrawn in place; into a pipe or a file it prints plain lines (one
per metric row, and one when the status or stage changes). ``medtune jobs watch`` and
``medtune demo`` both use it.
"""

from __future__ import annotations

import shutil
import statistics
from collections import deque
from datetime import datetime
from typing import Any, TextIO

from cli.output import duration, parse_time

# An interval between two metric rows this many times the recent per-step time (and at least
# GAP_MIN_S longer) is an outage, not training: a restarted server or worker, a resumed job.
GAP_FACTOR = 5.0
GAP_MIN_S = 5.0


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def progress_bar(done: int, total: int | None, width: int = 24) -> str:
    if not total:
        return "[" + "?" * width + "]"
    filled = min(width, round(width * done / total))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class StepRate:
    """Seconds per step from the metric rows' own timestamps: the last ``window`` intervals
    between consecutive rows, gaps left out.

    Server-side stamps, not arrival times: rows replayed in a burst when a watch starts late
    still give the real training pace. An interval far slower than the recent ones is an
    outage (after a restart, "115 s/step" was the downtime spread over the steps) and is
    skipped, as is any interval across a step that went backwards (a resume from a checkpoint).
    """

    def __init__(self, window: int = 20) -> None:
        self.last: tuple[datetime, int] | None = None
        self.intervals: deque[tuple[float, int]] = deque(maxlen=window)
        self.gaps = 0

    def add(self, row: dict[str, Any]) -> None:
        stamp = parse_time(row.get("created_at"))
        step = row.get("step")
        if stamp is None or not isinstance(step, int):
            return
        previous, self.last = self.last, (stamp, step)
        if previous is None or step <= previous[1]:
            return
        seconds, steps = max((stamp - previous[0]).total_seconds(), 0.0), step - previous[1]
        usual = self._usual()
        if usual is not None and seconds / steps > max(GAP_FACTOR * usual, usual + GAP_MIN_S):
            self.gaps += 1
            return
        self.intervals.append((seconds, steps))

    def _usual(self) -> float | None:
        per_step = [s / n for s, n in self.intervals]
        if not per_step:
            return None
        return statistics.median(per_step) if len(per_step) >= 3 else min(per_step)

    def seconds_per_step(self) -> float | None:
        # Judged again against the whole window: a slow first interval (a held-out evaluation
        # logged as step 0 before training, a cold start) had no recent pace to be judged by.
        usual = self._usual()
        kept = [
            (s, n)
            for s, n in self.intervals
            if usual is None
            or len(self.intervals) < 3
            or s / n <= max(GAP_FACTOR * usual, usual + GAP_MIN_S)
        ]
        steps = sum(n for _, n in kept)
        return sum(s for s, _ in kept) / steps if steps else None

    def eta(self, step: int, total: int | None) -> float | None:
        per_step = self.seconds_per_step()
        if per_step is None or not total:
            return None
        return max(total - step, 0) * per_step


def progress_line(
    row: dict[str, Any], total: int | None, rate: StepRate, stage: str | None = None
) -> str:
    step = int(row["step"])
    parts = [
        f"{stage or 'training'} {progress_bar(step, total)} {step:>4}/{total or '?'}",
        f"loss {_num(row.get('loss'), '.4f')}",
        f"{_num(row.get('tokens_per_second'), ',.0f')} tok/s",
    ]
    per_step = rate.seconds_per_step()
    if per_step is not None:
        parts.append(f"{per_step:.2f} s/step")
    parts.append(f"ETA {duration(rate.eta(step, total))}")
    return "  ".join(parts)


class Progress:
    """The job's bar: fed the event stream's ``status`` and ``metric`` events."""

    def __init__(self, out: TextIO, *, tty: bool | None = None) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.rate = StepRate()
        self.total: int | None = None
        self.state: tuple[str, str | None] | None = None
        self.row: dict[str, Any] | None = None
        self.open = False

    def status(self, data: dict[str, Any]) -> None:
        """A status event: it repeats with every step, so only a change is shown."""
        self.total = data.get("steps_total") or self.total
        state = (str(data.get("status")), data.get("stage"))
        if state == self.state:
            return
        self.state = state
        if self.tty and self.row is not None and state[0] == "running":
            self._draw(progress_line(self.row, self.total, self.rate, state[1]))
        else:
            self.note(f"[{state[0]}{' / ' + state[1] if state[1] else ''}]")

    def metric(self, row: dict[str, Any]) -> None:
        self.rate.add(row)
        self.row = row
        stage = self.state[1] if self.state else None
        self._draw(progress_line(row, self.total, self.rate, stage))

    def note(self, text: str) -> None:
        """A line of its own, above the bar."""
        self.close()
        self.out.write(text + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.open:
            self.out.write("\n")
            self.out.flush()
            self.open = False

    def _draw(self, text: str) -> None:
        if not self.tty:
            self.out.write(text + "\n")
        else:
            # Cut to the terminal's width: a wrapped line cannot be redrawn in place.
            width = shutil.get_terminal_size((100, 24)).columns - 1
            self.out.write("\r\x1b[K" + text[:width])
            self.open = True
        self.out.flush()
