"""The engine's batcher: batchable requests wait for company, the others never wait."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.inference.batching import Batcher, Pending

HOUR = 3600.0  # a window no test could wait out: a request that waited for it would hang


def run_group_recording(groups: list[list[str]]) -> Any:
    def run(group: Sequence[Pending]) -> None:
        groups.append([p.request["name"] for p in group])
        for pending in group:
            pending.future.set_result(len(group))

    return run


def test_batchable_requests_share_a_group() -> None:
    groups: list[list[str]] = []
    batcher = Batcher(
        run_group_recording(groups),
        group_key=lambda r: r["kind"],
        max_batch=2,
        wait_s=HOUR,  # the second request ends the wait by filling the batch
    )
    first = batcher.submit({"name": "a", "kind": "transformers"})
    second = batcher.submit({"name": "b", "kind": "transformers"})
    assert first.result(timeout=60) == second.result(timeout=60) == 2
    assert groups == [["a", "b"]]


def test_a_request_that_cannot_batch_does_not_wait_for_the_window() -> None:
    groups: list[list[str]] = []
    batcher = Batcher(
        run_group_recording(groups),
        group_key=lambda r: r["name"],
        max_batch=8,
        wait_s=HOUR,
        batchable=lambda r: r["kind"] == "transformers",
    )
    alone = batcher.submit({"name": "llama", "kind": "llama_cpp"})
    assert alone.result(timeout=60) == 1
    assert groups == [["llama"]]
