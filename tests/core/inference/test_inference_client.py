"""The API's side of an inference task and the worker's answer on the stream channel, without
Celery or a model: a queue that runs ``serve`` the way ``worker.tasks.infer_task`` does, with an
engine that answers in fixed pieces."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from core.errors import InferenceTimeout, JobNotReady, MedtuneError
from core.inference.engine import InferenceRequest
from core.inference.remote import ask, stream_answer
from core.inference.stream import FileChannel
from core.inference.task import serve
from core.queue import INFER_QUEUE, INFER_TASK

PIECES = ["Rest", " and", " fluids."]


class PiecesEngine:
    """Answers every request with PIECES, handing each to the request's ``on_delta``."""

    def __init__(self) -> None:
        self.loads: Counter[str] = Counter()
        self.requests: list[InferenceRequest] = []

    def submit(self, request: InferenceRequest) -> Future[dict[str, Any]]:
        self.requests.append(request)
        for piece in PIECES:
            if request.on_delta is not None:
                request.on_delta(piece)
        done: Future[dict[str, Any]] = Future()
        done.set_result({"answer": "".join(PIECES), "finish_reason": "stop"})
        return done


class Pending:
    def __init__(self) -> None:
        self.revoked = False

    def revoke(self) -> None:
        self.revoked = True


class WorkerQueue:
    """send_task runs the task's body at once, as an inference worker would."""

    def __init__(self, channel: FileChannel, *, fail: MedtuneError | None = None) -> None:
        self.channel = channel
        self.engine = PiecesEngine()
        self.fail = fail
        self.sent: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        self.pending = Pending()

    def send_task(
        self, name: str, *, args: list[Any], kwargs: dict[str, Any], **options: Any
    ) -> Pending:
        self.sent.append((name, kwargs, options))

        def build() -> InferenceRequest:
            if self.fail is not None:
                raise self.fail
            return InferenceRequest(base_model="smollm2-135m-instruct", messages=args[1])

        serve(
            self.engine,  # type: ignore[arg-type]
            build,
            channel=self.channel,
            stream_id=kwargs["stream_id"],
            deltas=kwargs.get("deltas", True),
        )
        return self.pending


class OldWorkerQueue(WorkerQueue):
    """A worker from before ``deltas``: it streams the pieces whatever the API asked."""

    def send_task(
        self, name: str, *, args: list[Any], kwargs: dict[str, Any], **options: Any
    ) -> Pending:
        return super().send_task(name, args=args, kwargs={**kwargs, "deltas": True}, **options)


class SilentQueue:
    def __init__(self) -> None:
        self.pending = Pending()

    def send_task(self, name: str, **_: Any) -> Pending:
        return self.pending


ARGS = [None, [{"role": "user", "content": "Fever?"}]]


@pytest.fixture
def channel(tmp_path: Path) -> FileChannel:
    return FileChannel(tmp_path / "streams")


def test_ask_gets_the_whole_answer_without_deltas(channel: FileChannel) -> None:
    queue = WorkerQueue(channel)
    result = ask(queue, channel, args=ARGS, kwargs={"use_adapter": False}, timeout_s=30)
    assert result["answer"] == "Rest and fluids."
    name, kwargs, options = queue.sent[0]
    assert name == INFER_TASK
    assert options["queue"] == INFER_QUEUE and options["ignore_result"] is True  # no backend
    # The headers name the job and the options, never the question.
    assert options["argsrepr"] == "(None, '<1 messages>')"
    assert "Fever" not in options["kwargsrepr"] and "'deltas': False" in options["kwargsrepr"]
    assert kwargs["deltas"] is False and kwargs["use_adapter"] is False
    assert queue.engine.requests[0].on_delta is None  # the worker published no deltas
    assert list(channel.folder.iterdir()) == []  # the stream's file is gone once read


def test_ask_skips_the_deltas_of_an_older_worker(channel: FileChannel) -> None:
    queue = OldWorkerQueue(channel)
    result = ask(queue, channel, args=ARGS, kwargs={}, timeout_s=30)
    assert result["answer"] == "Rest and fluids."
    assert queue.engine.requests[0].on_delta is not None


def test_ask_raises_the_workers_problem(channel: FileChannel) -> None:
    queue = WorkerQueue(channel, fail=JobNotReady("job j is queued", field="job_id"))
    with pytest.raises(MedtuneError) as info:
        ask(queue, channel, args=ARGS, kwargs={}, timeout_s=30)
    assert (info.value.code, info.value.status, info.value.field) == (
        "job_not_ready",
        409,
        "job_id",
    )
    assert not queue.pending.revoked


def test_ask_revokes_the_task_when_no_worker_answers(channel: FileChannel) -> None:
    queue = SilentQueue()
    with pytest.raises(InferenceTimeout):
        ask(queue, channel, args=ARGS, kwargs={}, timeout_s=0.05)
    assert queue.pending.revoked


def test_a_stream_still_gets_the_deltas(channel: FileChannel) -> None:
    queue = WorkerQueue(channel)
    events = list(stream_answer(queue, channel, args=ARGS, kwargs={}, timeout_s=30))
    assert [e["type"] for e in events] == ["delta"] * len(PIECES) + ["done"]
    assert [e["text"] for e in events[:-1]] == PIECES
    _, kwargs, options = queue.sent[0]
    assert "deltas" not in kwargs and options["ignore_result"] is True


class StuckQueue:
    """A worker that reports how far it got (``reached``), then never answers."""

    def __init__(self, channel: FileChannel, reached: list[str]) -> None:
        self.channel = channel
        self.reached = reached
        self.pending = Pending()
        self.stream_id = ""

    def send_task(self, name: str, *, kwargs: dict[str, Any], **_: Any) -> Pending:
        self.stream_id = kwargs["stream_id"]
        for kind in self.reached:
            self.channel.publish(self.stream_id, {"type": kind})
        return self.pending


@pytest.mark.parametrize(
    ("reached", "wording"),
    [
        ([], "no inference worker took the request"),
        (["accepted"], "busy with earlier requests"),
        (["accepted", "started"], "the answer took longer than"),
    ],
)
def test_a_timeout_says_how_far_the_request_got_and_cancels_it(
    channel: FileChannel, reached: list[str], wording: str
) -> None:
    queue = StuckQueue(channel, reached)
    with pytest.raises(InferenceTimeout) as info:
        ask(queue, channel, args=ARGS, kwargs={}, timeout_s=0.2)
    assert wording in info.value.detail and "MEDTUNE_INFER_TIMEOUT_S" in info.value.detail
    assert ("consuming the medtune.infer queue" in info.value.detail) == (not reached)
    assert channel.cancelled(queue.stream_id) and queue.pending.revoked  # the worker stops
    channel.forget(queue.stream_id)
    assert list(channel.folder.iterdir()) == []
