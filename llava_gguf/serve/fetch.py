"""An image URL in a request, turned into its bytes under the server's policy (serve layer, request side):
`data:` URIs decoded with a size cap, `file://` only below `--media-root`, `http(s)://` only with
`--allow-remote-images` and then through an SSRF guard. Every failure is an ApiError naming the request field.

The guard: the host name is resolved once, every address it resolves to must pass `policy.allow_address`
(`public_address` refuses loopback, private, link-local, multicast, reserved and shared addresses, and IPv6
forms embedding one), and the connection goes to an address that was checked, never through a second lookup
(DNS rebinding). The Host header, TLS SNI and certificate check still use the name. No redirects are
followed (a 3xx could point anywhere), the body is capped at `policy.max_bytes` and the whole fetch at
`policy.timeout` seconds."""
from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import os
import socket
import ssl
import stat
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llava_gguf.serve.errors import ApiError, invalid, one_line

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MiB = 1024 * 1024
# IPv6 prefixes that carry an IPv4 address a packet may end up at: NAT64 (RFC 6052) and 6to4 (RFC 3056)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598): not the public internet


def public_address(ip: IPAddress) -> bool:
    """True for an address on the public internet; False for loopback, private, link-local, multicast,
    reserved, unspecified and shared (100.64/10) ones, and IPv6 addresses that embed such an IPv4 address
    (IPv4-mapped ::ffff:a.b.c.d, NAT64 64:ff9b::/96, 6to4 2002::/16)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None:
            return public_address(embedded)
        if ip.teredo is not None or ip.is_site_local:
            return False
    elif ip in _SHARED:
        return False
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


@dataclass(frozen=True)
class ImagePolicy:
    """Where a request's images may come from, and how big they may be."""

    media_root: Path | None = None  # file:// URLs only below it (symlinks resolved); None: no file:// at all
    allow_remote: bool = False  # http(s):// URLs at all
    max_bytes: int = 20 * MiB  # per image, as fetched or decoded (413 above it)
    max_images: int = 8  # per request (400 above it)
    timeout: float = 10.0  # seconds for one remote fetch, start to end
    # pixels per image, read from its header before decoding (413 above): Pillow's decompression-bomb warning
    # limit (89 MP). A few bytes can declare 160 MP that take seconds to decode; the CLI decodes such an image
    # with a warning, a server refuses it (LLaVA sees at most 1008x1008 pixels anyway)
    max_pixels: int = 89_478_485
    allow_address: Callable[[IPAddress], bool] = public_address  # the SSRF guard (tests widen it in-process)


def image_bytes(url: str, policy: ImagePolicy, param: str) -> bytes:
    """The bytes of the image at `url` (a request's image_url.url, named `param` in errors)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_uri(url, policy.max_bytes, param)
    if scheme == "file":
        return resolve_file(url, policy.media_root, policy.max_bytes, param)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise ApiError(400, f"{param}: http(s) image URLs are not fetched by this server (it was started "
                           "without --allow-remote-images); send the image as a data: URI", param=param,
                           code="image_url_not_allowed")
        return fetch_image(url, policy, param)
    raise invalid(f"{param} must be a data:image/...;base64 URI (or an http(s):// or file:// URL where the server "
                  f"allows them), not {one_line(url, 60)!r}", param, "invalid_image_url")


def too_large(param: str, size: int | None, max_bytes: int) -> ApiError:
    got = f"{size} bytes" if size is not None else "more"
    return ApiError(413, f"{param}: the image is {got}, above this server's limit of {max_bytes} bytes per image "
                    "(--max-image-bytes)", param=param, code="image_too_large")


def decode_data_uri(url: str, max_bytes: int, param: str) -> bytes:
    """A base64 `data:` URI's bytes; the size is checked before decoding (a huge payload is never decoded)."""
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise invalid(f"{param} must be a base64 data URI (data:image/png;base64,...)", param, "invalid_image_url")
    payload = "".join(payload.split())  # MIME-style line breaks some clients put in
    payload = payload.rstrip("=")
    if len(payload) * 3 // 4 > max_bytes:
        raise too_large(param, len(payload) * 3 // 4, max_bytes)
    altchars = b"-_" if ("-" in payload or "_" in payload) else None  # the URL-safe alphabet, sometimes sent
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{param}: the data URI's payload is not valid base64", param, "invalid_base64") from None
    if not data:
        raise invalid(f"{param}: the data URI holds no data", param, "invalid_image")
    return data


def resolve_file(url: str, media_root: Path | None, max_bytes: int, param: str) -> bytes:
    """The bytes of a `file://` URL's regular file, which must lie below `media_root` once every symlink and
    `..` is resolved (an escape through a link is refused like a path outside it)."""
    if media_root is None:
        raise ApiError(400, f"{param}: file:// image URLs are refused (the server was started without "
                       "--media-root); send the image as a data: URI", param=param, code="image_url_not_allowed")
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise invalid(f"{param} must be file:///absolute/path (no host, query or fragment)", param,
                      "invalid_image_url")
    path = Path(urllib.request.url2pathname(parts.path))
    if not path.is_absolute():
        raise invalid(f"{param} must be an absolute file:// path", param, "invalid_image_url")
    outside = ApiError(400, f"{param}: {one_line(str(path), 200)} is not below the server's --media-root",
                       param=param, code="image_url_not_allowed")
    try:
        root = Path(media_root).resolve(strict=True)
        real = path.resolve(strict=False)
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        raise outside from None
    if not real.is_relative_to(root):
        raise outside
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: the last component, swapped
        # for a symlink since resolve(), is refused
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise invalid(f"{param}: {one_line(str(path), 200)} does not exist", param, "image_not_found") from None
    except OSError as e:
        raise invalid(f"{param}: cannot open {one_line(str(path), 200)} ({e.strerror})", param,
                      "image_not_found") from None
    try:
        where = Path(f"/proc/self/fd/{fd}")
        # a directory on the way swapped for a symlink since resolve(): where the descriptor really points
        if where.exists() and not Path(os.readlink(where)).is_relative_to(root):
            raise outside
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise invalid(f"{param}: {one_line(str(path), 200)} is not a regular file", param, "invalid_image")
        if st.st_size > max_bytes:
            raise too_large(param, st.st_size, max_bytes)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise too_large(param, None, max_bytes)
    return data


def _resolve(host: str, port: int, timeout: float) -> list[tuple]:
    """getaddrinfo with a time limit (it has none of its own): run in a daemon thread and waited for."""
    out: list = []

    def lookup() -> None:
        try:
            out.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as e:
            out.append(e)

    t = threading.Thread(target=lookup, name="llava-gguf-dns", daemon=True)
    t.start()
    t.join(timeout)
    if not out:
        raise TimeoutError(f"resolving {host} took longer than {timeout:g} s")
    if isinstance(out[0], Exception):
        raise out[0]
    return out[0]


class _Pinned:
    """Connects an http.client connection to addresses checked in advance instead of resolving the name."""

    addresses: list[tuple[int, tuple]]
    opened: socket.socket | None = None  # kept: http.client drops `sock` when the server closes after the answer

    def open_socket(self, timeout: float) -> socket.socket:
        last: OSError | None = None
        for family, sockaddr in self.addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                sock.close()
                last = e
        raise last or OSError("no address to connect to")

    def cut(self) -> None:
        """End the connection from another thread (the deadline passed): a blocked read returns at once."""
        if self.opened is not None:
            try:
                self.opened.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class PinnedHTTPConnection(_Pinned, http.client.HTTPConnection):
    def __init__(self, host: str, port: int, addresses: list[tuple[int, tuple]], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.addresses = addresses

    def connect(self) -> None:
        self.sock = self.opened = self.open_socket(self.timeout)


class PinnedHTTPSConnection(_Pinned, http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, addresses: list[tuple[int, tuple]], timeout: float) -> None:
        self.tls = ssl.create_default_context()  # certificate and host name checked, as browsers do
        super().__init__(host, port, timeout=timeout, context=self.tls)
        self.addresses = addresses

    def connect(self) -> None:
        sock = self.open_socket(self.timeout)
        try:
            self.sock = self.opened = self.tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def checked_addresses(host: str, port: int, policy: ImagePolicy, param: str, timeout: float) -> list[tuple[int, tuple]]:
    """Every address `host` resolves to, each passed by the policy's guard (one refused: the URL is refused)."""
    addresses: list[tuple[int, tuple]] = []
    for family, _type, _proto, _name, sockaddr in _resolve(host, port, timeout):
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if not policy.allow_address(ip):
            raise ApiError(400, f"{param}: {one_line(host, 100)} resolves to {ip}, which is not a public internet "
                           "address; the server does not fetch from it (SSRF guard)", param=param,
                           code="image_url_not_allowed")
        if (family, sockaddr) not in addresses:
            addresses.append((family, sockaddr))
    return addresses


def fetch_image(url: str, policy: ImagePolicy, param: str) -> bytes:
    """GET an http(s) image URL under the policy (see the module's docstring)."""
    def fail(why: str, code: str = "image_fetch_failed") -> ApiError:
        return ApiError(400, f"{param}: fetching {one_line(url, 120)} failed: {why}", param=param, code=code)

    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError as e:
        raise invalid(f"{param} is not a valid URL ({e})", param, "invalid_image_url") from None
    host = parts.hostname
    if not host:
        raise invalid(f"{param} has no host name", param, "invalid_image_url")
    if parts.username is not None or parts.password is not None:
        raise invalid(f"{param}: image URLs with user:password@ are not fetched", param, "invalid_image_url")
    deadline = time.monotonic() + policy.timeout
    expired = threading.Event()

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0 or expired.is_set():
            raise TimeoutError
        return left

    try:
        addresses = checked_addresses(host, port, policy, param, remaining())
        if not addresses:
            raise fail(f"{one_line(host, 100)} has no address")
        cls = PinnedHTTPSConnection if parts.scheme.lower() == "https" else PinnedHTTPConnection
        conn = cls(host, port, addresses, remaining())

        def expire() -> None:
            expired.set()
            conn.cut()

        # socket timeouts bound each wait; this bounds the whole (a server sending one byte a second)
        watchdog = threading.Timer(remaining(), expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", target, headers={"User-Agent": "llava-gguf", "Accept": "image/*",
                                                 "Accept-Encoding": "identity"})
            resp = conn.getresponse()
            if 300 <= resp.status < 400:
                where = resp.getheader("Location") or "?"
                raise fail(f"it answered HTTP {resp.status} (a redirect to {one_line(where, 100)}); redirects are "
                           "not followed", "image_url_redirect")
            if not 200 <= resp.status < 300:
                raise fail(f"it answered HTTP {resp.status} {one_line(resp.reason, 60)}")
            length = resp.getheader("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > policy.max_bytes:
                raise too_large(param, int(length), policy.max_bytes)
            chunks: list[bytes] = []
            size = 0
            while size <= policy.max_bytes and not resp.isclosed():  # closed: the whole body was read
                conn.opened.settimeout(remaining())
                chunk = resp.read(min(64 * 1024, policy.max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            remaining()  # the watchdog cut the answer short: a timeout, not a truncated image
            if size > policy.max_bytes:
                raise too_large(param, None, policy.max_bytes)
            return b"".join(chunks)
        finally:
            watchdog.cancel()
            conn.close()
    except ApiError:
        raise
    except (OSError, http.client.HTTPException, ValueError, UnicodeError) as e:  # TimeoutError is an OSError
        if expired.is_set() or isinstance(e, TimeoutError):
            raise fail(f"no complete answer within {policy.timeout:g} s", "image_fetch_timeout") from None
        if isinstance(e, ssl.SSLCertVerificationError):
            raise fail(f"its TLS certificate is not valid ({one_line(e.verify_message or str(e), 100)})") from None
        raise fail(one_line(f"{type(e).__name__}: {e}", 160)) from None
