"""A small typed HTTP client for the medtune API, used by the CLI and the demo.

It speaks only HTTP (httpx), so it works against any medtune server and imports nothing from
``api`` or ``worker``. Every error answer (``application/problem+json``) becomes an
:class:`ApiError` with the server's stable ``code``; a server that cannot be reached becomes a
:class:`ServerUnreachable`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


def default_url() -> str:
    return os.environ.get("MEDTUNE_URL") or DEFAULT_URL


class ClientError(Exception):
    """Anything that stops a client call from getting its answer."""


class ApiError(ClientError):
    """The server answered with an error (a problem+json body where the server is medtune)."""

    def __init__(
        self, *, status: int, code: str, detail: str, field: str | None = None, body: Any = None
    ) -> None:
        super().__init__(f"{code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.field = field
        self.body = body

    @classmethod
    def of(cls, response: httpx.Response) -> ApiError:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "code" in body:
            return cls(
                status=response.status_code,
                code=str(body["code"]),
                detail=str(body.get("detail") or body.get("title") or ""),
                field=body.get("field"),
                body=body,
            )
        # Not a medtune problem (a proxy's error page, say): keep what can be said.
        text = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
        return cls(
            status=response.status_code,
            code=f"http_{response.status_code}",
            detail=text or response.reason_phrase,
            body=body,
        )


class ServerUnreachable(ClientError):
    """No medtune server answered at the URL."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the medtune API at {url} ({reason})")
        self.url = url
        self.reason = reason


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of GET /jobs/{id}/events: ``metric``, ``status`` or ``end``."""

    event: str
    data: dict[str, Any]
    id: str | None = None


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Server-Sent Events from a stream of lines (comments and ``retry:`` are skipped)."""
    event_id: str | None = None
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield Event(event=event, data=json.loads("\n".join(data)), id=event_id)
            event_id, event, data = None, "message", []
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


class MedtuneClient:
    """The medtune REST API as methods returning its JSON bodies (plain dicts).

    ``with MedtuneClient(url) as client: client.create_job(spec)``. Pass ``transport`` to test
    against an in-process app.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout: float = 30,
        read_timeout: float = 600,
        transport: httpx.BaseTransport | None = None,
        api_key: str | None = None,
    ) -> None:
        self.url = (url or default_url()).rstrip("/")
        key = api_key or os.environ.get("MEDTUNE_API_KEY")
        # Long reads: /infer waits for a worker, and an event stream can be quiet for minutes.
        self._http = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(timeout, read=read_timeout),
            transport=transport,
            headers={"Authorization": f"Bearer {key}"} if key else None,
        )

    def __enter__(self) -> MedtuneClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- plumbing ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise ServerUnreachable(self.url, "connection refused") from exc
        except httpx.TimeoutException as exc:
            raise ServerUnreachable(self.url, f"timed out: {type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise ServerUnreachable(self.url, str(exc) or type(exc).__name__) from exc
        if response.is_error:
            raise ApiError.of(response)
        return response.json()

    # --- the API ----------------------------------------------------------------------------

    def healthy(self) -> bool:
        try:
            return self._http.get("/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def wait_healthy(self, timeout_s: float = 120) -> None:
        """Wait for /healthz; raise ServerUnreachable after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if time.monotonic() > deadline:
                raise ServerUnreachable(self.url, f"not healthy after {timeout_s:.0f} s")
            time.sleep(0.5)

    def create_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._request("POST", "/jobs", json=spec)
        return result

    def list_jobs(
        self, *, status: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> dict[str, Any]:
        """One page: ``{"data": [...], "has_more", "next_cursor"}``, newest first."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        result: dict[str, Any] = self._request("GET", "/jobs", params=params)
        return result

    def iter_jobs(self, *, status: str | None = None, page_size: int = 100) -> Iterator[dict]:
        """Every job, newest first, following the cursor page by page."""
        cursor: str | None = None
        while True:
            page = self.list_jobs(status=status, limit=page_size, cursor=cursor)
            yield from page["data"]
            cursor = page.get("next_cursor")
            if not page.get("has_more") or not cursor:
                return

    def get_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/jobs/{job_id}")
        return result

    def get_evaluation(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/jobs/{job_id}/evaluation")
        return result

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("POST", f"/jobs/{job_id}/cancel")
        return result

    def delete_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("DELETE", f"/jobs/{job_id}")
        return result

    def metrics(self, job_id: str, *, after_step: int = -1, limit: int = 100) -> dict[str, Any]:
        """One page of per-step rows; pass ``last_step`` back as ``after_step`` for the next."""
        result: dict[str, Any] = self._request(
            "GET", f"/jobs/{job_id}/metrics", params={"after_step": after_step, "limit": limit}
        )
        return result

    def events(
        self, job_id: str, *, after_step: int = -1, reconnects: int = 5, backoff_s: float = 2.0
    ) -> Iterator[Event]:
        """The job's event stream until its ``end`` event.

        A dropped connection is resumed with ``Last-Event-ID`` (the last metric step seen), so
        no row is lost or repeated; after ``reconnects`` failures in a row it gives up.
        """
        last_id = str(after_step) if after_step >= 0 else None
        failures = 0
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with self._http.stream(
                    "GET", f"/jobs/{job_id}/events", headers=headers
                ) as response:
                    if response.is_error:
                        response.read()
                        raise ApiError.of(response)
                    for event in parse_sse(response.iter_lines()):
                        failures = 0
                        if event.id is not None:
                            last_id = event.id
                        yield event
                        if event.event == "end":
                            return
            except httpx.ConnectError as exc:
                failures += 1
                if failures > reconnects:
                    raise ServerUnreachable(self.url, "connection refused") from exc
            except httpx.TransportError as exc:
                failures += 1
                if failures > reconnects:
                    raise ServerUnreachable(self.url, f"event stream lost: {exc}") from exc
            else:
                failures += 1  # the server closed the stream before its end event
                if failures > reconnects:
                    raise ServerUnreachable(self.url, "event stream closed before its end")
            time.sleep(min(backoff_s * failures, 10.0))

    def infer(
        self,
        job_id: str,
        question: str,
        *,
        use_adapter: bool = True,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"job_id": job_id, "question": question, "use_adapter": use_adapter}
        if max_new_tokens is not None:
            body["max_new_tokens"] = max_new_tokens
        if temperature is not None:
            body["temperature"] = temperature
        result: dict[str, Any] = self._request("POST", "/infer", json=body)
        return result

    # --- files ------------------------------------------------------------------------------

    def upload_file(
        self,
        path: str | os.PathLike[str],
        *,
        purpose: str = "fine-tune",
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Upload a dataset file (streamed from disk); its id goes in training_dataset.name."""
        source = Path(path)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        with source.open("rb") as fh:
            result: dict[str, Any] = self._request(
                "POST",
                "/files",
                files={"file": (source.name, fh)},
                data={"purpose": purpose},
                headers=headers,
            )
        return result

    def list_files(self, *, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        """One page, newest first: ``{"data": [...], "has_more", "last_id"}``."""
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        result: dict[str, Any] = self._request("GET", "/files", params=params)
        return result

    def iter_files(self, *, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every file, newest first, page by page."""
        after: str | None = None
        while True:
            page = self.list_files(limit=page_size, after=after)
            yield from page["data"]
            after = page.get("last_id")
            if not page.get("has_more") or not after:
                return

    def create_export(
        self,
        job_id: str,
        *,
        formats: list[str],
        gguf_quantizations: list[str] | None = None,
        push_to_hub: bool = False,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"formats": formats, "push_to_hub": push_to_hub}
        if gguf_quantizations:
            body["gguf_quantizations"] = gguf_quantizations
        result: dict[str, Any] = self._request("POST", f"/jobs/{job_id}/exports", json=body)
        return result

    def list_artifacts(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/jobs/{job_id}/artifacts")
        return result

    @contextmanager
    def stream_artifact(self, job_id: str, fmt: str, file_name: str) -> Iterator[httpx.Response]:
        """The open download of one listed file; its sha256 is in ``x-checksum-sha256``."""
        try:
            with self._http.stream("GET", f"/jobs/{job_id}/artifacts/{fmt}/{file_name}") as resp:
                if resp.is_error:
                    resp.read()
                    raise ApiError.of(resp)
                yield resp
        except httpx.ConnectError as exc:
            raise ServerUnreachable(self.url, "connection refused") from exc
        except httpx.TransportError as exc:
            raise ServerUnreachable(self.url, str(exc) or type(exc).__name__) from exc

    def get_file(self, file_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/files/{file_id}")
        return result

    def delete_file(self, file_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("DELETE", f"/files/{file_id}")
        return result
