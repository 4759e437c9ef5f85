"""The metrics path: batched writes, rows merged by step, stamps, throttled cancel reads, ETA."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from core.job_metrics import DatabaseSink
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.training.meter import StepMeter, memory_mb
from core.training.sink import BufferedSink, ListSink, TeeSink


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder(BufferedSink):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.writes: list[list[dict[str, Any]]] = []
        self.fail = False

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        if self.fail:
            raise ConnectionError("database down")
        self.writes.append([dict(r) for r in rows])


def test_rows_are_written_every_max_rows() -> None:
    clock = FakeClock()
    sink = Recorder(max_rows=3, max_seconds=60, clock=clock, background=False)
    for step in range(1, 8):
        sink.log(step, {"loss": float(step)})
    assert [[r["step"] for r in w] for w in sink.writes] == [[1, 2, 3], [4, 5, 6]]
    sink.flush()
    assert [r["step"] for r in sink.writes[-1]] == [7]
    sink.flush()  # nothing buffered: no empty write
    assert len(sink.writes) == 3


def test_rows_are_written_once_max_seconds_have_passed() -> None:
    clock = FakeClock()
    sink = Recorder(max_rows=100, max_seconds=2.0, clock=clock, background=False)
    sink.log(1, {"loss": 1.0})
    clock.now += 1.0
    sink.log(2, {"loss": 2.0})
    assert sink.writes == []
    clock.now += 1.5
    sink.log(3, {"loss": 3.0})
    assert [[r["step"] for r in w] for w in sink.writes] == [[1, 2, 3]]


def test_rows_of_one_step_merge_and_keep_the_first_stamp() -> None:
    sink = Recorder(max_rows=100, max_seconds=60, clock=FakeClock())
    sink.log(5, {"eval_loss": 1.25})
    sink.log(5, {"loss": 2.0, "eval_loss": None, "grad_norm": 0.5})
    sink.flush()
    (row,) = sink.writes[0]
    assert row["step"] == 5 and row["loss"] == 2.0 and row["grad_norm"] == 0.5
    assert row["eval_loss"] == 1.25  # a None never overwrites a measured value
    assert isinstance(row["created_at"], datetime)


class SlowRecorder(Recorder):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.release = threading.Event()

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        assert self.release.wait(10)
        super().write_rows(rows)


def test_the_writer_thread_writes_and_flush_waits_for_it() -> None:
    sink = SlowRecorder(max_rows=2, max_seconds=60, clock=FakeClock())
    sink.log(1, {"loss": 1.0})
    sink.log(2, {"loss": 2.0})  # handed to the writer thread, which is still blocked
    sink.log(3, {"loss": 3.0})
    assert sink.writes == []
    sink.release.set()
    sink.flush()  # returns only once every row is written
    assert [[r["step"] for r in w] for w in sink.writes] == [[1, 2], [3]]
    writer = sink._writer
    assert writer is not None and writer.is_alive()
    sink.close()
    assert not writer.is_alive()  # no thread left behind per training run


@pytest.mark.parametrize("background", [True, False])
def test_a_failed_write_is_raised_by_flush_and_retried(background: bool) -> None:
    sink = Recorder(max_rows=1, max_seconds=60, clock=FakeClock(), background=background)
    sink.fail = True
    sink.log(1, {"loss": 1.0})  # the write fails here (or on the writer thread)
    sink.log(2, {"loss": 2.0})
    with pytest.raises(ConnectionError):
        sink.flush()  # before a checkpoint: the trainer must not go on as if stored
    sink.fail = False
    sink.flush()
    assert [[r["step"] for r in w] for w in sink.writes] == [[1, 2]]
    sink.close()


def test_tee_sends_everything_to_every_sink() -> None:
    first, second = ListSink(), ListSink()
    tee = TeeSink(first, second)
    tee.begin(10)
    tee.log(1, {"loss": 1.0})
    tee.flush()
    assert not tee.should_stop()
    second.stop = True
    assert tee.should_stop()
    for sink in (first, second):
        assert sink.total_steps == 10 and sink.rows == [{"step": 1, "loss": 1.0}]
        assert sink.flushes == 1


def test_step_meter_rates_exclude_paused_time_and_give_an_eta() -> None:
    clock = FakeClock()
    meter = StepMeter(window=3, clock_fn=clock)
    meter.start(step=0, tokens=0, samples=0)
    clock.now += 2.0
    row = meter.row(step=1, total_steps=11, tokens=1000, samples=4)
    assert row["tokens_per_second"] == pytest.approx(500.0)
    assert row["samples_per_second"] == pytest.approx(2.0)
    assert row["eta_seconds"] == pytest.approx(20.0)  # 2 s a step, 10 steps left
    clock.now += 3.0
    meter.pause(2.0)  # an evaluation: not training time
    row = meter.row(step=2, total_steps=11, tokens=2000, samples=8)
    assert row["tokens_per_second"] == pytest.approx(1000.0)
    assert row["eta_seconds"] == pytest.approx(9.0)  # 1 s a step since step 1, 9 left
    for step in (3, 4, 5, 6):
        clock.now += 0.5
        row = meter.row(step=step, total_steps=11, tokens=1000 * step, samples=4 * step)
    assert row["eta_seconds"] == pytest.approx(0.5 * 5)  # the window holds the last 3 steps


def test_memory_on_the_cpu_has_no_reserve_and_a_peak_at_least_the_current() -> None:
    allocated, reserved, peak = memory_mb()
    assert allocated > 0 and peak >= allocated
    assert reserved is None


@pytest.fixture
def running_job(sqlite_url: str) -> str:
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, JobSpec()).id
        assert jobs.claim(s, job_id, worker="w")
    return job_id


def _stored(url: str, job_id: str) -> list[Any]:
    with session_scope(url) as s:
        rows, _ = jobs.metrics_page(s, job_id, after_step=-1, limit=1000)
        return list(rows)


def test_database_sink_writes_in_batches_with_the_logging_time(
    sqlite_url: str, running_job: str
) -> None:
    sink = DatabaseSink(sqlite_url, running_job, max_rows=4, max_seconds=3600, background=False)
    sink.begin(10)
    before = datetime.now(UTC)
    for step in (1, 2, 3):
        sink.log(step, {"loss": 3.0 - step / 10, "reserved_memory_mb": 12.0, "eta_seconds": 9.0})
    assert _stored(sqlite_url, running_job) == []  # buffered: no round trip per step
    sink.log(4, {"loss": 2.5})
    rows = _stored(sqlite_url, running_job)
    assert [r.step for r in rows] == [1, 2, 3, 4]
    assert rows[0].reserved_memory_mb == 12.0 and rows[0].eta_seconds == 9.0
    stamp = rows[0].created_at.replace(tzinfo=rows[0].created_at.tzinfo or UTC)
    assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC)
    with session_scope(sqlite_url) as s:
        job = jobs.get_job(s, running_job)
        assert (job.steps_done, job.steps_total) == (4, 10)


def test_a_later_row_of_a_stored_step_fills_its_empty_fields_only(
    sqlite_url: str, running_job: str
) -> None:
    with session_scope(sqlite_url) as s:
        jobs.add_metrics(s, running_job, [{"step": 2, "loss": 1.5}])
        jobs.add_metrics(s, running_job, [{"step": 2, "loss": 9.0, "eval_loss": 1.75}])
        jobs.add_metrics(s, running_job, [{"step": 2, "loss": 9.0}, {"step": 3, "loss": 1.4}])
    rows = _stored(sqlite_url, running_job)
    assert [(r.step, r.loss, r.eval_loss) for r in rows] == [(2, 1.5, 1.75), (3, 1.4, None)]


def test_cancel_is_read_at_most_once_per_poll_interval(
    sqlite_url: str, running_job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    real = jobs.cancel_requested
    monkeypatch.setattr(
        jobs, "cancel_requested", lambda s, job_id: reads.append(job_id) or real(s, job_id)
    )
    sink = DatabaseSink(sqlite_url, running_job, cancel_poll_s=3600)
    assert not sink.should_stop()
    assert not sink.should_stop()
    assert len(reads) == 1
    eager = DatabaseSink(sqlite_url, running_job, cancel_poll_s=0)
    with session_scope(sqlite_url) as s:
        jobs.request_cancel(s, running_job)
    assert eager.should_stop()
    assert eager.should_stop()  # stays stopped without another read
    assert len(reads) == 2
