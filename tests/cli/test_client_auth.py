"""The HTTP client sends MEDTUNE_API_KEY as a bearer token, and nothing without one."""

from __future__ import annotations

import httpx
import pytest

from cli.client import MedtuneClient


def _seen(monkeypatch: pytest.MonkeyPatch, key: str | None) -> list[str | None]:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(
            200, json={"object": "list", "data": [], "has_more": False, "next_cursor": None}
        )

    if key is None:
        monkeypatch.delenv("MEDTUNE_API_KEY", raising=False)
    else:
        monkeypatch.setenv("MEDTUNE_API_KEY", key)
    with MedtuneClient("http://medtune.test", transport=httpx.MockTransport(handler)) as client:
        client.list_jobs()
    return seen


def test_key_from_the_environment_is_a_bearer_token(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _seen(monkeypatch, "mt_secret") == ["Bearer mt_secret"]
    assert _seen(monkeypatch, None) == [None]
