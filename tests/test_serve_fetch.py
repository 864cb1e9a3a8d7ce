"""serve/fetch.py on a real HTTP(S) server on 127.0.0.1 (a thread of this process): the SSRF guard refuses
loopback targets by default and no request reaches the server; with the guard widened in-process, an image is
fetched from the address that was checked (Host header and TLS name check still use the host name), a redirect
is not followed, a body over the cap is a 413, and a slow or trickling server is cut off within the timeout.
file:// URLs: only below the media root, after resolving `..` and symlinks."""
from __future__ import annotations

import base64
import io
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from llava_gguf.serve.errors import ApiError
from llava_gguf.serve.fetch import ImagePolicy, fetch_image, image_bytes, public_address, resolve_file
from llava_gguf.serve.protocol import parse_chat_request

PARAM = "messages[0].content[0].image_url.url"


def png_bytes(colour=(0, 128, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), colour).save(buf, "PNG")
    return buf.getvalue()


PNG = png_bytes()


class Handler(BaseHTTPRequestHandler):
    seen: list[tuple[str, str]]  # (path, Host header) of every request, set per server

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Host", "")))
        path = self.path.split("?", 1)[0]
        if path == "/x.png":
            self.reply(200, PNG, {"Content-Type": "image/png"})
        elif path == "/redirect":
            self.reply(302, b"", {"Location": "/x.png"})
        elif path == "/missing":
            self.reply(404, b"no such image")
        elif path == "/huge-length":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            self.wfile.write(b"\0" * 1000)
        elif path == "/no-length":  # more than the cap, without saying so: read until the cap, then stop
            self.send_response(200)
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\0" * 4096)
        elif path == "/slow":  # answers after 3 s (bounded, so the server thread ends)
            time.sleep(3)
            self.reply(200, PNG)
        elif path == "/trickle":  # headers at once, then one byte every 0.1 s for up to 3 s
            self.send_response(200)
            self.send_header("Content-Length", "30")
            self.end_headers()
            try:
                for _ in range(30):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass  # the client gave up: as it should
        else:
            self.reply(404, b"")

    def reply(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up on /slow (as it must) is not news


def serve(tls: ssl.SSLContext | None = None):
    seen: list = []
    handler = type("H", (Handler,), {"seen": seen})
    server = QuietServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread, seen


@pytest.fixture(scope="module")
def http():
    server, thread, seen = serve()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


LOOPBACK = ImagePolicy(allow_remote=True, timeout=1.0, max_bytes=64 * 1024,
                       allow_address=lambda ip: ip.is_loopback)  # the guard widened, in this process only


def refused(url: str, policy: ImagePolicy, status: int, code: str, *words) -> ApiError:
    with pytest.raises(ApiError) as info:
        image_bytes(url, policy, PARAM)
    e = info.value
    assert (e.status, e.param, e.code) == (status, PARAM, code), e.body()
    assert "\n" not in e.message
    for w in words:
        assert w.lower() in e.message.lower(), e.message
    return e


# ---- the SSRF guard


@pytest.mark.parametrize("address", ["10.1.2.3", "172.16.0.1", "172.31.255.254", "192.168.1.1", "169.254.169.254",
                                     "127.0.0.1", "::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "fe80::1", "fc00::1",
                                     "224.0.0.1", "ff02::1", "0.0.0.0", "::", "100.64.0.1", "255.255.255.255",
                                     "240.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::1", "::127.0.0.1", "192.0.2.1"])
def test_public_address_refuses(address):
    assert public_address(ipaddress.ip_address(address)) is False


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "2001:4860:4860::8888",
                                     "64:ff9b::808:808", "::ffff:8.8.8.8"])
def test_public_address_allows(address):
    assert public_address(ipaddress.ip_address(address)) is True


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.1", "0x7f000001", "[::ffff:127.0.0.1]"])
def test_the_default_guard_refuses_loopback_and_nothing_is_sent(http, host):
    port, seen = http
    before = len(seen)
    refused(f"http://{host}:{port}/x.png", ImagePolicy(allow_remote=True, timeout=2), 400, "image_url_not_allowed",
            "SSRF")
    assert len(seen) == before  # refused before connecting


def test_every_resolved_address_must_pass(http):
    # "localhost" resolves to 127.0.0.1 here; a guard refusing exactly that refuses the URL
    port, _ = http
    policy = ImagePolicy(allow_remote=True, allow_address=lambda ip: ip != ipaddress.ip_address("127.0.0.1"))
    refused(f"http://localhost:{port}/x.png", policy, 400, "image_url_not_allowed", "127.0.0.1")


# ---- with the guard widened to loopback


def test_an_image_is_fetched_with_the_host_name_in_the_host_header(http):
    port, seen = http
    assert image_bytes(f"http://localhost:{port}/x.png", LOOPBACK, PARAM) == PNG
    assert seen[-1] == ("/x.png", f"localhost:{port}")
    assert fetch_image(f"http://127.0.0.1:{port}/x.png?size=big", LOOPBACK, PARAM) == PNG
    assert seen[-1][0] == "/x.png?size=big"


def test_a_request_with_a_remote_image(http):
    port, _ = http
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"http://localhost:{port}/x.png"}},
        {"type": "text", "text": "what colour?"}]}]}
    r = parse_chat_request(body, policy=LOOPBACK)
    assert r.images[0].size == (16, 12) and r.images[0].getpixel((0, 0)) == (0, 128, 255)


def test_a_redirect_is_not_followed(http):
    port, seen = http
    before = len(seen)
    refused(f"http://localhost:{port}/redirect", LOOPBACK, 400, "image_url_redirect", "302", "not followed")
    assert [p for p, _ in seen[before:]] == ["/redirect"]


def test_an_error_status_is_a_400(http):
    refused(f"http://localhost:{http[0]}/missing", LOOPBACK, 400, "image_fetch_failed", "404")


def test_a_declared_length_over_the_cap_is_413_before_reading(http):
    t = time.monotonic()
    refused(f"http://localhost:{http[0]}/huge-length", LOOPBACK, 413, "image_too_large", str(10**9))
    assert time.monotonic() - t < 1.0


def test_a_body_over_the_cap_without_a_length_is_413(http):
    refused(f"http://localhost:{http[0]}/no-length", LOOPBACK, 413, "image_too_large", str(64 * 1024))


@pytest.mark.parametrize("path", ["/slow", "/trickle"])
def test_a_slow_server_is_cut_off_within_the_timeout(http, path):
    policy = ImagePolicy(allow_remote=True, timeout=0.6, allow_address=lambda ip: ip.is_loopback)
    t = time.monotonic()
    refused(f"http://localhost:{http[0]}{path}", policy, 400, "image_fetch_timeout", "0.6 s")
    assert time.monotonic() - t < 1.2


def test_nothing_listening_is_a_400():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: the connection is refused
        refused(f"http://localhost:{port}/x.png", LOOPBACK, 400, "image_fetch_failed", "refused")


@pytest.mark.parametrize("url", ["http://user:pw@localhost/x.png", "http:///x.png", "http://localhost:99999/x.png"])
def test_malformed_urls(url):
    refused(url, LOOPBACK, 400, "invalid_image_url")


@pytest.fixture(scope="module")
def https(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate for the name "localhost" only."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem"), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True, timeout=60)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(d / "cert.pem", d / "key.pem")
    server, thread, seen = serve(tls)
    try:
        yield server.server_address[1], d / "cert.pem", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_https_checks_the_certificate_against_the_host_name(https, monkeypatch):
    port, cert, seen = https
    # not trusted: refused
    refused(f"https://localhost:{port}/x.png", LOOPBACK, 400, "image_fetch_failed", "certificate")
    # trusted (OpenSSL reads SSL_CERT_FILE when a default context loads its roots): fetched over the pinned
    # address with SNI and the name check for "localhost"; the same server by IP fails the name check
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    assert image_bytes(f"https://localhost:{port}/x.png", LOOPBACK, PARAM) == PNG
    assert seen[-1] == ("/x.png", f"localhost:{port}")
    refused(f"https://127.0.0.1:{port}/x.png", LOOPBACK, 400, "image_fetch_failed", "certificate")


# ---- file:// under the media root


@pytest.fixture
def media(tmp_path) -> tuple[Path, Path]:
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(png_bytes((255, 0, 0)))
    return root, tmp_path


def test_a_file_under_the_root(media):
    root, _ = media
    assert resolve_file((root / "sub" / "a.png").as_uri(), root, 10**6, PARAM) == PNG
    assert resolve_file("file://localhost" + str(root / "sub" / "a.png"), root, 10**6, PARAM) == PNG
    os.symlink(root / "sub" / "a.png", root / "link.png")  # a link that stays inside: fine
    assert resolve_file((root / "link.png").as_uri(), root, 10**6, PARAM) == PNG
    # a root given through a symlink is resolved too
    os.symlink(root, root.parent / "media-link")
    assert resolve_file((root / "sub" / "a.png").as_uri(), root.parent / "media-link", 10**6, PARAM) == PNG


def test_files_outside_the_root_are_refused(media):
    root, outside = media
    os.symlink(outside / "secret.png", root / "escape.png")
    os.symlink(outside, root / "sub" / "up")
    policy = ImagePolicy(media_root=root)
    for url in [(outside / "secret.png").as_uri(), f"file://{root}/../secret.png", f"file://{root}/sub/../../secret.png",
                (root / "escape.png").as_uri(), (root / "sub" / "up" / "secret.png").as_uri(), "file:///etc/passwd",
                f"file://{root}/%2E%2E/secret.png"]:
        e = refused(url, policy, 400, "image_url_not_allowed", "--media-root")
        assert "secret" not in e.message or "not below" in e.message


def test_odd_files_under_the_root(media):
    root, _ = media
    policy = ImagePolicy(media_root=root, max_bytes=20)
    assert len(PNG) > 20
    refused((root / "nothing.png").as_uri(), policy, 400, "image_not_found", "does not exist")
    refused((root / "sub").as_uri(), policy, 400, "invalid_image", "not a regular file")
    os.mkfifo(root / "pipe")
    t = time.monotonic()
    refused((root / "pipe").as_uri(), policy, 400, "invalid_image", "not a regular file")
    assert time.monotonic() - t < 1  # a FIFO is not waited on
    refused((root / "sub" / "a.png").as_uri(), policy, 413, "image_too_large", "limit of 20 bytes")
    refused("file://otherhost/etc/passwd", policy, 400, "invalid_image_url")
    refused("file:relative.png", policy, 400, "invalid_image_url")


def test_no_media_root_no_files(media):
    root, _ = media
    refused((root / "sub" / "a.png").as_uri(), ImagePolicy(), 400, "image_url_not_allowed", "--media-root")


def test_data_uri_size_is_checked_before_decoding():
    payload = base64.b64encode(b"\0" * 5000).decode()
    refused("data:image/png;base64," + payload, ImagePolicy(max_bytes=4000), 413, "image_too_large")
    assert image_bytes("data:image/png;base64," + payload, ImagePolicy(max_bytes=5000), PARAM) == b"\0" * 5000
