"""Who may talk to the server, checked before any route runs (an ASGI middleware): a server bound to loopback
answers only requests whose Host is a loopback name (DNS rebinding: a web page whose name re-resolves to
127.0.0.1 would otherwise read the API and the page as same-origin — Ollama's CVE-2024-28224), and a browser
request from another origin is refused unless --cors-origin allows it (a page could otherwise POST to the
API, unasked, from any site the user visits)."""
from __future__ import annotations

import ipaddress
import json
import urllib.parse
from collections.abc import Iterable

from llava_gguf.serve.errors import ApiError

LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() in LOOPBACK_NAMES


def host_name(netloc: str) -> str:
    """The host of a Host header or URL authority, without the port ("[::1]:8080" -> "::1")."""
    if netloc.startswith("["):
        return netloc[1:].split("]", 1)[0]
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def problem(headers: dict[str, str], *, loopback_only: bool, cors_origins: Iterable[str]) -> ApiError | None:
    """Why a request must be refused (403), or None. `headers`: lower-case names."""
    host = headers.get("host", "")
    if loopback_only and not is_loopback(host_name(host).lower()):
        return ApiError(403, f"this server listens on loopback and answers only to localhost, not to the Host "
                        f"{host[:100]!r}", code="invalid_host")
    origin = headers.get("origin")
    if origin is None or origin in set(cors_origins):
        return None
    parsed = urllib.parse.urlsplit(origin)
    if origin != "null" and parsed.netloc and parsed.netloc.lower() == host.lower():
        return None  # the page itself (same origin)
    return ApiError(403, f"requests from the web origin {origin[:100]!r} are not allowed",
                    code="origin_not_allowed")


class Guard:
    """The ASGI middleware: `problem()` on every HTTP request, answered in OpenAI's error shape."""

    def __init__(self, app, *, loopback_only: bool, cors_origins: Iterable[str] = ()) -> None:
        self.app, self.loopback_only, self.cors_origins = app, loopback_only, tuple(cors_origins)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            refused = problem(headers, loopback_only=self.loopback_only, cors_origins=self.cors_origins)
            if refused is not None:
                body = json.dumps(refused.body()).encode()
                await send({"type": "http.response.start", "status": refused.status,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
