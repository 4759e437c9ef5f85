"""Per-step figures a trainer cannot read off its logs: throughput, memory and time left."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


def memory_mb() -> tuple[float, float | None, float]:
    """(allocated, reserved, peak) memory of this process in MiB.

    On CUDA: the caching allocator's allocated and reserved bytes and the peak allocated. On the
    CPU there is no reserve: the resident set and its high-water mark, reserved None.
    """
    import torch

    if torch.cuda.is_available():
        return (
            torch.cuda.memory_allocated() / 2**20,
            torch.cuda.memory_reserved() / 2**20,
            torch.cuda.max_memory_allocated() / 2**20,
        )
    import resource

    import psutil

    rss = psutil.Process().memory_info().rss / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    return rss, None, max(peak, rss)


@dataclass
class StepMeter:
    """Turns running counters into one logging step's throughput and ETA.

    Time spent outside training steps (evaluation, checkpoints) is left out with ``pause``,
    so tokens/s is the training rate and the ETA is steps remaining x the recent step time:
    over the last ``window`` logging points, which leave out the first step (warm-up and
    kernel compilation make it many times longer) once a second one is logged.
    """

    window: int = 20  # logging points the ETA looks back over
    clock_fn: Callable[[], float] = time.perf_counter
    _paused: float = 0.0
    _last: tuple[float, int, int] = (0.0, 0, 0)
    _origin: tuple[int, float] = (0, 0.0)
    _points: deque[tuple[int, float]] = field(default_factory=deque)

    def clock(self) -> float:
        return self.clock_fn() - self._paused

    def start(self, *, step: int, tokens: int, samples: int) -> None:
        self._last = (self.clock(), tokens, samples)
        self._origin = (step, self._last[0])
        self._points = deque(maxlen=self.window + 1)

    def pause(self, seconds: float) -> None:
        self._paused += seconds

    def row(self, *, step: int, total_steps: int, tokens: int, samples: int) -> dict[str, float]:
        now = self.clock()
        elapsed = max(now - self._last[0], 1e-9)
        values = {
            "tokens_per_second": (tokens - self._last[1]) / elapsed,
            "samples_per_second": (samples - self._last[2]) / elapsed,
        }
        self._last = (now, tokens, samples)
        self._points.append((step, now))
        first_step, first_time = self._points[0] if len(self._points) > 1 else self._origin
        if step > first_step:
            per_step = (now - first_time) / (step - first_step)
            values["eta_seconds"] = per_step * max(total_steps - step, 0)
        return values
