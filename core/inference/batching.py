"""Collect concurrent inference requests for a few milliseconds and run them as one batch.

One thread owns the models: requests from any thread (a Celery threads pool, a benchmark) are
queued with a Future; the thread takes the first, waits up to ``wait_s`` for more (up to
``max_batch``), splits them into groups that can share one ``generate`` call (same base model,
backend and sampling settings) and runs each group. A request's failure fails its Future only.
A request that can never share a batch (``batchable`` false: llama.cpp, the CUDA-graph path)
does not wait out the window: it runs with whatever was already queued.

``waiting`` tells a long generation that a request from outside waits, so it can end its turn
and ``requeue`` itself behind that request (core/inference/engine.py). ``settle`` turns a
generation into its Future's answer (or ``InferenceCancelled``); ``chain`` hands a request on
to another lane's Future.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from core.errors import MedtuneError
from core.inference.generate import Generation

log = logging.getLogger(__name__)


class InferenceCancelled(MedtuneError):
    """Nobody waits for the answer any more (the API timed out, the client went away)."""

    code = "inference_cancelled"
    status = 499


@dataclass
class Pending:
    request: Any
    future: Future[Any] = field(default_factory=Future)
    fresh: bool = True  # submitted from outside (not a requeued turn)


RunGroup = Callable[[Sequence[Pending]], None]  # sets every Pending's future


class Batcher:
    def __init__(
        self,
        run_group: RunGroup,
        group_key: Callable[[Any], Hashable],
        *,
        max_batch: int = 8,
        wait_s: float = 0.005,
        name: str = "medtune-inference",
        batchable: Callable[[Any], bool] = lambda request: True,
    ) -> None:
        self._run_group = run_group
        self._group_key = group_key
        self._batchable = batchable
        self.max_batch = max_batch
        self.wait_s = wait_s
        self._queue: queue.Queue[Pending] = queue.Queue()
        self._fresh = 0  # fresh requests in the queue
        self._fresh_lock = threading.Lock()
        self.batch_sizes: list[int] = []  # sizes of the groups run, for tests and benchmarks
        self._running = False  # a batch is being answered
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, request: Any) -> Future[Any]:
        pending = Pending(request)
        with self._fresh_lock:
            self._fresh += 1
        self._queue.put(pending)
        return pending.future

    def requeue(self, request: Any) -> None:
        """Run ``request`` again after what waits now (a paused generation's next turn)."""
        self._queue.put(Pending(request, fresh=False))

    def waiting(self) -> bool:
        """Whether a request from outside waits for this thread."""
        return self._fresh > 0

    def idle(self) -> bool:
        """Nothing queued and nothing being answered (a paused turn counts as queued)."""
        return not self._running and self._queue.empty()

    def _take(self, *, block: bool = True, timeout: float | None = None) -> Pending:
        pending = self._queue.get(block=block, timeout=timeout)
        if pending.fresh:
            with self._fresh_lock:
                self._fresh -= 1
        return pending

    def _collect(self) -> list[Pending]:
        batch = [self._take()]
        wait_s = self.wait_s if self._batchable(batch[0].request) else 0.0
        deadline = time.monotonic() + wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                batch.append(
                    self._take(timeout=remaining) if remaining > 0 else self._take(block=False)
                )
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        while True:
            self._running = False
            batch = self._collect()
            self._running = True
            groups: dict[Hashable, list[Pending]] = {}
            for pending in batch:
                if pending.future.set_running_or_notify_cancel():
                    groups.setdefault(self._group_key(pending.request), []).append(pending)
            for group in groups.values():
                self.batch_sizes.append(len(group))
                try:
                    self._run_group(group)
                except BaseException as exc:  # the thread must outlive any request
                    log.exception("inference batch of %d failed", len(group))
                    for pending in group:
                        if not pending.future.done():
                            pending.future.set_exception(exc)


def settle(
    pending: Pending, gen: Generation, *, backend: str, batch_size: int, **extra: Any
) -> None:
    if gen.cancelled:  # nobody reads this answer: the task logs it and publishes nothing
        detail = f"stopped after {gen.completion_tokens} tokens: nobody waits for the answer"
        pending.future.set_exception(InferenceCancelled(detail))
    else:
        pending.future.set_result(gen.as_result(backend=backend, batch_size=batch_size, **extra))


def chain(source: Future[Any], target: Future[Any]) -> None:
    """Settle ``target`` with whatever ``source`` ends with."""

    def done(f: Future[Any]) -> None:
        error = f.exception()
        if error is not None:
            target.set_exception(error)
        else:
            target.set_result(f.result())

    source.add_done_callback(done)
