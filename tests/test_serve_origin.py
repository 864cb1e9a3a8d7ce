"""Who may talk to a default `llava-gguf serve` (loopback, no key): only requests naming a loopback Host (a
DNS-rebinding page, whose name now resolves to 127.0.0.1, is refused — Ollama's CVE-2024-28224), no browser
request from a foreign origin unless --cors-origin allows it, and JSON only (a form or text/plain POST is what a
foreign page can send without a preflight)."""
from __future__ import annotations

import http.client
import json

import pytest

from llava_gguf.serve.guard import host_name, is_loopback, problem
from support import serve_process

BODY = json.dumps({"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2})


def call(url: str, method: str, path: str, headers: dict, body: str | None = None) -> tuple[int, dict, dict]:
    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.putrequest(method, path, skip_host="Host" in headers, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        data = body.encode() if body is not None else b""
        conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data)
        r = conn.getresponse()
        raw = r.read()
        kind = r.getheader("content-type", "")
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(raw) if "json" in kind else raw
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server(shipped_gguf):
    with serve_process(shipped_gguf, "--parallel", "1", "--cors-origin", "http://tools.example") as url:
        yield url


def test_loopback_names():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("evil.example", "10.0.0.1", "0.0.0.0", "localhost.evil.example"))
    assert [host_name(h) for h in ("a:8080", "[::1]:80", "::1", "b")] == ["a", "::1", "::1", "b"]
    assert problem({"host": "127.0.0.1:80", "origin": "null"}, loopback_only=True, cors_origins=()).code \
        == "origin_not_allowed"
    assert problem({"host": "evil.example"}, loopback_only=False, cors_origins=()) is None  # --host 0.0.0.0


def test_a_rebinding_host_is_refused_everywhere(server):
    for path in ("/health", "/", "/v1/models", "/metrics"):
        status, _, body = call(server, "GET", path, {"Host": "rebind.evil.example:8080"})
        assert status == 403 and body["error"]["code"] == "invalid_host", (path, body)
    status, _, body = call(server, "POST", "/v1/chat/completions",
                           {"Host": "rebind.evil.example", "Content-Type": "application/json"}, BODY)
    assert status == 403 and body["error"]["code"] == "invalid_host"
    for host in ("localhost", server.split("//")[1], "[::1]:1234"):  # what people type
        status, _, body = call(server, "GET", "/health", {"Host": host})
        assert status == 200 and body["status"] == "ok"


def test_a_foreign_origin_is_refused_and_an_allowed_one_gets_cors(server):
    hostport = server.split("//")[1]
    status, _, body = call(server, "POST", "/v1/chat/completions",
                           {"Host": hostport, "Origin": "http://evil.example", "Content-Type": "application/json"}, BODY)
    assert status == 403 and body["error"]["code"] == "origin_not_allowed"
    # the page itself (same origin) and the origin given with --cors-origin are answered
    status, _, body = call(server, "POST", "/v1/chat/completions",
                           {"Host": hostport, "Origin": server, "Content-Type": "application/json"}, BODY)
    assert status == 200 and body["object"] == "chat.completion"
    status, headers, body = call(server, "POST", "/v1/chat/completions",
                                 {"Host": hostport, "Origin": "http://tools.example",
                                  "Content-Type": "application/json"}, BODY)
    assert status == 200 and headers.get("access-control-allow-origin") == "http://tools.example"
    status, headers, _ = call(server, "OPTIONS", "/v1/chat/completions",
                              {"Host": hostport, "Origin": "http://tools.example",
                               "Access-Control-Request-Method": "POST",
                               "Access-Control-Request-Headers": "content-type, authorization"})
    assert status == 200 and headers.get("access-control-allow-origin") == "http://tools.example"


def test_only_json_bodies(server):
    hostport = server.split("//")[1]
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Host": hostport} | ({"Content-Type": kind} if kind else {})
        status, _, body = call(server, "POST", "/v1/chat/completions", headers, BODY)
        assert status == 415 and body["error"]["code"] == "unsupported_media_type", (kind, body)
    status, _, body = call(server, "POST", "/v1/chat/completions",
                           {"Host": hostport, "Content-Type": "application/json; charset=utf-8"}, BODY)
    assert status == 200
