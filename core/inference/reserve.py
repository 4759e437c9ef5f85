"""Memory an inference worker keeps free on its card for training (issue #14).

Two sources reserve room, and neither may clobber the other:

- a training job on the same card, named by its warm message (core/inference/warm.py): the
  job's memory estimate, held from the moment it starts training until its own worker says it
  has ended (``medtune.memory_freed``). Only that job releases it; a message about another job
  leaves it alone. A training worker runs one job at a time (one process per GPU), so a new
  job's reservation from the same worker replaces its earlier job's, which was left behind if
  that job's end message was lost.
- a standing reservation (``MEDTUNE_INFER_PRELOAD``): room for a recipe job that may come on a
  card shared with a training worker. It is never released.

A running job fills the room a standing reservation keeps for one, so what is held is the larger
of the standing reservation and the sum of the jobs' reservations, not their sum.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

_ENDED_KEPT = 1024  # released job ids remembered (ids are unique: any bound will do)


@dataclass(frozen=True)
class _Held:
    nbytes: int
    worker: str | None


class Reservations:
    """Bytes kept free by owner: a job id, or a standing reservation's name."""

    def __init__(self) -> None:
        self._jobs: dict[str, _Held] = {}
        self._standing: dict[str, int] = {}
        # Jobs already released: the worker's task pool may run a job's late warm message after
        # its end message (a job that failed at once); that hold would never be released.
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        with self._lock:
            jobs = sum(held.nbytes for held in self._jobs.values())
            return max(jobs, max(self._standing.values(), default=0))

    def hold(self, owner: str, nbytes: int, *, worker: str | None = None) -> None:
        """Keep ``nbytes`` for the training job ``owner`` (run by the training ``worker``)."""
        with self._lock:
            if owner in self._ended:
                return
            if worker is not None:
                for other, held in list(self._jobs.items()):
                    if held.worker == worker and other != owner:
                        del self._jobs[other]  # that worker's earlier job is over
            self._jobs[owner] = _Held(int(nbytes), worker)

    def stand(self, name: str, nbytes: int) -> None:
        """Keep ``nbytes`` for a job that may come (released by nobody)."""
        with self._lock:
            self._standing[name] = int(nbytes)

    def release(self, owner: str) -> bool:
        """Drop the job ``owner``'s reservation; False if it held none."""
        with self._lock:
            self._ended[owner] = None
            while len(self._ended) > _ENDED_KEPT:
                self._ended.popitem(last=False)
            return self._jobs.pop(owner, None) is not None

    def owners(self) -> list[str]:
        with self._lock:
            return [*self._jobs, *self._standing]
