"""What a trainer reports to, so training code knows nothing of databases or queues."""

from __future__ import annotations

from typing import Protocol


class MetricsSink(Protocol):
    def begin(self, total_steps: int) -> None:
        """Called once the trainer knows how many optimizer steps it will run."""

    def log(self, step: int, values: dict[str, float | None]) -> None:
        """One logging step's metrics."""

    def should_stop(self) -> bool:
        """Polled at step boundaries: True when the job was cancelled."""


class ListSink:
    """Keeps metrics in memory: for tests, benchmarks and the bare CLI."""

    def __init__(self) -> None:
        self.total_steps = 0
        self.rows: list[dict[str, float | None]] = []
        self.stop = False

    def begin(self, total_steps: int) -> None:
        self.total_steps = total_steps

    def log(self, step: int, values: dict[str, float | None]) -> None:
        self.rows.append({"step": step, **values})

    def should_stop(self) -> bool:
        return self.stop
