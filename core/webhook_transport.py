"""Webhook POSTs sent only to the addresses the target check approved.

``check_target`` resolves a URL's host and refuses inward addresses; if httpx were then given
the URL it would resolve the name again, and a hostile DNS server could answer a public address
to the check and 127.0.0.1 (or 169.254.169.254) to the connection (DNS rebinding). So the
request goes to a checked IP literal, with the URL's own ``Host`` header and, for https, the
name as TLS SNI and for certificate verification (httpcore's ``sni_hostname`` extension): the
receiver sees the request it saw before.

No proxy from the environment is used: a proxy would resolve the name itself, and a tunnelled
TLS would check the certificate against the IP.
"""

from __future__ import annotations

import httpx


def post(
    url: str,
    addresses: list[str],
    *,
    body: bytes,
    headers: dict[str, str],
    timeout_s: float,
    transport: httpx.BaseTransport | None = None,
) -> int:
    """POST ``body`` to ``url`` at the first of ``addresses`` that connects; the HTTP status."""
    target = httpx.URL(url)
    # What httpx sends for the URL itself: lower-case, IDNA-encoded, the port if not default.
    headers = {**headers, "host": target.netloc.decode("ascii")}
    name = target.raw_host.decode("ascii")
    extensions = {"sni_hostname": name} if target.scheme == "https" else {}
    # The addresses share the connect timeout, so a name with many dead ones still ends in time.
    timeout = httpx.Timeout(timeout_s, connect=timeout_s / max(len(addresses), 1))
    # An explicit transport: httpx then reads no proxy from the environment (see above).
    transport = transport or httpx.HTTPTransport()
    error: httpx.TransportError = httpx.ConnectError(f"{target.host!r} has no address")
    with httpx.Client(timeout=timeout, follow_redirects=False, transport=transport) as client:
        for address in addresses:
            try:
                response = client.post(
                    target.copy_with(host=address),
                    content=body,
                    headers=headers,
                    extensions=extensions,
                )
                return response.status_code
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                error = exc  # nothing was sent: the next address may answer
    raise error
