"""Keep a running job's lease alive from a background thread while its worker works on it."""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from core.errors import LeaseLost
from core.store import jobs
from core.store.db import session_scope

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews the lease every third of its length until the block ends.

    A database hiccup is logged and retried at the next beat; the lease has slack for two
    missed renewals before another worker may take the job over. When a renewal finds the job
    no longer this worker's (the reconciler requeued it after a long outage, and another worker
    may hold it now), ``lost`` is set: the run must stop and write nothing more for the job.
    """

    def __init__(self, url: str, job_id: str, *, worker: str, lease_s: float) -> None:
        self.url, self.job_id, self.worker, self.lease_s = url, job_id, worker, lease_s
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                with session_scope(self.url) as s:
                    renewed = jobs.renew_lease(
                        s, self.job_id, worker=self.worker, lease_s=self.lease_s
                    )
            except Exception:  # keep beating: the next renewal may succeed
                log.exception("lease renewal of %s failed", self.job_id)
                continue
            if not renewed:
                log.warning("job %s is no longer held by %s: stopping", self.job_id, self.worker)
                self.lost.set()
                return

    def check(self) -> None:
        """Raise LeaseLost once the job has been taken from this worker."""
        if self.lost.is_set():
            raise LeaseLost(
                f"job {self.job_id} was requeued while {self.worker} ran it (its lease lapsed); "
                "this run stops and leaves the job to its new worker"
            )
