"""`llava-gguf serve`'s guards, on real server processes (one per group): a client that disconnects frees its
sequence, full slots and a full queue answer 503 with Retry-After, the API key is checked on every API route
(and only there), every bad input gets its status and OpenAI's error body, the SSRF guard and --media-root
hold, response_format yields JSON that validates, and /metrics is Prometheus text that counts."""
from __future__ import annotations

import base64
import http.client
import http.server
import io
import json
import re
import struct
import threading
import time
import urllib.parse
import zlib

import jsonschema
import numpy as np
import openai
import pytest
from PIL import Image

from devkit.tiny import sample_image
from llava_gguf.demo import shapes
from llava_gguf.serve.run import body_limit
from support import image_uri, serve_process, user_turn

KEY = "sk-test-0123456789"
LONG = 8000  # tokens: the tiny model makes 100 (streamed) to 3000 a second here: an answer this long runs for seconds
LONG_CTX = "8192"
POLL = 15.0  # seconds a state change observed through /metrics may take
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"'
SAMPLE = re.compile(rf"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{{{LABEL}(?:,{LABEL})*\}})? (\S+)")  # name{labels} value


# ---------------------------------------------------------------------------------------------- helpers
def request(url: str, method: str = "GET", path: str = "/", body: object = None, *, raw: bytes | None = None,
            headers: dict | None = None, timeout: float = 60) -> tuple[int, dict, bytes]:
    """One raw HTTP request (what the openai client would refuse to send): status, headers, body."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def openai_error(status: int, body: bytes, want: int, code: str | None = None, param: str | None = None) -> dict:
    """The body is OpenAI's error shape with all four keys and a one-line message; its `error` object."""
    assert status == want, body[:500]
    assert b"Traceback" not in body and b"File \"" not in body
    obj = json.loads(body)
    assert set(obj) == {"error"}, obj
    err = obj["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"].strip() and "\n" not in err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def metrics(url: str, key: str | None = None) -> dict[str, float]:
    """/metrics as {'name{labels}': value}, after checking the text format (every sample's family has its
    # HELP and # TYPE lines, every value is a number)."""
    status, headers, body = request(url, path="/metrics", headers={"Authorization": f"Bearer {key}"} if key else {})
    assert status == 200, body[:300]
    assert headers["content-type"].startswith("text/plain")
    helped, typed, samples = set(), {}, {}
    for line in body.decode().splitlines():
        if not line.strip():
            continue
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            typed[name] = kind
        else:
            m = SAMPLE.fullmatch(line)
            assert m, f"not a Prometheus sample line: {line!r}"
            assert m.group(1) in helped and m.group(1) in typed, line
            samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def wait_until(check, what: str, timeout: float = POLL):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(0.1)


def client(url: str, key: str = "none", timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_pair(tiny, converted):
    return converted(tiny(), "f16")


@pytest.fixture(scope="module")
def small_uri():
    return image_uri(sample_image(112, seed=5), "JPEG")


def start_long_stream(c: openai.OpenAI, image_uri: str):
    """A streaming request that runs for many seconds (sampled at temperature 1: no early end), admitted
    (its first chunks read) before this returns."""
    stream = c.chat.completions.create(model="tiny", messages=[user_turn("Tell me a long story.", image_uri)],
                                       max_tokens=LONG, temperature=1.0, seed=1, stream=True)
    chunks = iter(stream)
    for _ in range(4):
        next(chunks)
    return stream


# ---------------------------------------------------------------------------------------------- cancellation, queue
@pytest.fixture(scope="module")
def one_slot(tiny_pair):
    llm, mmproj = tiny_pair
    with serve_process(llm, "--mmproj", mmproj, "--parallel", "1", "--queue", "0", "--ctx", LONG_CTX,
                       "--threads", "2", "--model-alias", "tiny") as url:
        yield url


def test_client_disconnect_cancels_and_frees_the_sequence(one_slot, small_uri):
    before = metrics(one_slot)
    stream = start_long_stream(client(one_slot), small_uri)
    try:
        running = metrics(one_slot)
        assert running['llava_gguf_slot_state{slot="0",state="generating"}'] == 1
        assert running['llava_gguf_slot_cached_positions{slot="0"}'] > 64  # the image rows at least
    finally:
        stream.close()  # the client goes away mid-answer
    after = wait_until(lambda: (m := metrics(one_slot))['llava_gguf_requests_total{outcome="cancelled"}']
                       == before['llava_gguf_requests_total{outcome="cancelled"}'] + 1 and m,
                       "the disconnected request counted as cancelled")
    assert after['llava_gguf_slot_state{slot="0",state="idle"}'] == 1
    # its cells are freed (an answer that ran to its end would keep them for a follow-up, and count as accepted only)
    assert after['llava_gguf_slot_cached_positions{slot="0"}'] == 0
    assert after["llava_gguf_completion_tokens_total"] - before["llava_gguf_completion_tokens_total"] < LONG
    r = client(one_slot).chat.completions.create(model="tiny", messages=[user_turn("Hello.", small_uri)], max_tokens=4,
                                                 temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1


def test_full_slots_and_no_queue_answer_503_with_retry_after(one_slot, small_uri):
    before = metrics(one_slot)
    stream = start_long_stream(client(one_slot), small_uri)
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            client(one_slot).chat.completions.create(model="tiny", messages=[user_turn("Hi.")], max_tokens=2)
        e = caught.value
        assert int(e.response.headers["retry-after"]) >= 1
        openai_error(e.status_code, e.response.content, 503, "server_is_overloaded")
        status, headers, body = request(one_slot, "POST", "/v1/chat/completions",
                                        {"messages": [user_turn("Hi.")], "max_tokens": 2})
        openai_error(status, body, 503, "server_is_overloaded")
        assert int(headers["retry-after"]) >= 1
    finally:
        stream.close()
    m = metrics(one_slot)
    assert m['llava_gguf_requests_total{outcome="rejected_queue_full"}'] \
        == before['llava_gguf_requests_total{outcome="rejected_queue_full"}'] + 2


@pytest.fixture(scope="module")
def queue_of_one(tiny_pair):
    llm, mmproj = tiny_pair
    with serve_process(llm, "--mmproj", mmproj, "--parallel", "1", "--queue", "1", "--ctx", LONG_CTX,
                       "--threads", "2", "--model-alias", "tiny") as url:
        yield url


def test_a_queued_request_waits_and_completes_after_the_running_one_is_cancelled(queue_of_one, small_uri):
    stream = start_long_stream(client(queue_of_one), small_uri)
    result: dict = {}

    def waiting() -> None:
        try:
            result["r"] = client(queue_of_one).chat.completions.create(
                model="tiny", messages=[user_turn("Hello.", small_uri)], max_tokens=4, temperature=0)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            result["e"] = e

    waiter = threading.Thread(target=waiting, daemon=True)
    try:
        waiter.start()
        wait_until(lambda: metrics(queue_of_one)["llava_gguf_queue_depth"] == 1, "the second request queued")
        # the third finds the slot busy and the queue full
        status, headers, body = request(queue_of_one, "POST", "/v1/chat/completions",
                                        {"messages": [user_turn("Hi.")], "max_tokens": 2})
        openai_error(status, body, 503, "server_is_overloaded")
        assert int(headers["retry-after"]) >= 1
        assert waiter.is_alive() and not result  # still waiting while the first one runs
    finally:
        stream.close()
    waiter.join(60)
    assert not waiter.is_alive(), "the queued request never completed"
    assert "e" not in result, result.get("e")
    assert result["r"].choices[0].finish_reason in ("stop", "length")
    assert metrics(queue_of_one)["llava_gguf_queue_depth"] == 0


def open_request(url: str, body: dict) -> http.client.HTTPConnection:
    """A request sent and not read: the caller closes the connection (a client that gives up)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn


def test_a_non_streaming_client_that_disconnects_frees_the_sequence(one_slot, small_uri):
    cancelled = 'llava_gguf_requests_total{outcome="cancelled"}'
    before = metrics(one_slot)
    conn = open_request(one_slot, {"model": "tiny", "messages": [user_turn("Tell me a long story.", small_uri)],
                                   "max_tokens": LONG, "temperature": 1.0, "seed": 2})
    try:
        wait_until(lambda: metrics(one_slot)['llava_gguf_slot_state{slot="0",state="generating"}'] == 1,
                   "the request generating")
    finally:
        conn.close()
    after = wait_until(lambda: (m := metrics(one_slot))[cancelled] == before[cancelled] + 1 and m,
                       "the disconnected request counted as cancelled")
    assert after['llava_gguf_slot_state{slot="0",state="idle"}'] == 1
    assert after['llava_gguf_slot_cached_positions{slot="0"}'] == 0
    assert after["llava_gguf_completion_tokens_total"] - before["llava_gguf_completion_tokens_total"] < LONG


def test_a_queued_client_that_disconnects_leaves_the_queue(queue_of_one, small_uri):
    cancelled = 'llava_gguf_requests_total{outcome="cancelled"}'
    before = metrics(queue_of_one)
    stream = start_long_stream(client(queue_of_one), small_uri)
    try:
        conn = open_request(queue_of_one, chat(user_turn("Hello.", small_uri)))
        wait_until(lambda: metrics(queue_of_one)["llava_gguf_queue_depth"] == 1, "the second request queued")
        conn.close()
        wait_until(lambda: metrics(queue_of_one)["llava_gguf_queue_depth"] == 0, "the queue emptied")
        # the queue has room again while the first request still runs
        assert metrics(queue_of_one)['llava_gguf_slot_state{slot="0",state="generating"}'] == 1
    finally:
        stream.close()
    wait_until(lambda: metrics(queue_of_one)[cancelled] == before[cancelled] + 2, "both requests cancelled")
    assert metrics(queue_of_one)['llava_gguf_requests_total{outcome="accepted"}'] \
        == before['llava_gguf_requests_total{outcome="accepted"}'] + 2


# ---------------------------------------------------------------------------------------------- API key
@pytest.fixture(scope="module", params=["--api-key", "env"])
def keyed(request, tiny_pair):
    llm, mmproj = tiny_pair
    args, env = (["--api-key", KEY], None) if request.param == "--api-key" else ([], {"LLAVA_GGUF_API_KEY": KEY})
    with serve_process(llm, "--mmproj", mmproj, "--parallel", "1", "--threads", "2", "--model-alias", "tiny",
                       *args, env=env) as url:
        yield url


@pytest.mark.parametrize("method,path,body", [("GET", "/v1/models", None), ("GET", "/v1/models/tiny", None),
                                              ("GET", "/metrics", None),
                                              ("POST", "/v1/chat/completions", {"messages": [user_turn("Hi.")]})])
@pytest.mark.parametrize("auth", [None, "Bearer wrong-key-0123", f"Basic {KEY}", "Bearer "])
def test_api_routes_refuse_a_missing_or_wrong_key(keyed, method, path, body, auth):
    status, headers, data = request(keyed, method, path, body, headers={"Authorization": auth} if auth else {})
    openai_error(status, data, 401, "invalid_api_key")
    assert headers.get("www-authenticate", "").lower().startswith("bearer")


def test_the_openai_client_with_a_wrong_key_gets_authentication_error(keyed):
    bad = client(keyed, "wrong-key-0123")
    for call in (lambda: bad.models.list(),
                 lambda: bad.chat.completions.create(model="tiny", messages=[user_turn("Hi.")], max_tokens=2)):
        with pytest.raises(openai.AuthenticationError) as caught:
            call()
        openai_error(caught.value.status_code, caught.value.response.content, 401, "invalid_api_key")


def test_the_key_opens_the_api(keyed, small_uri):
    good = client(keyed, KEY)
    assert [m.id for m in good.models.list().data] == ["tiny"]
    r = good.chat.completions.create(model="tiny", messages=[user_turn("Hello.", small_uri)], max_tokens=3,
                                     temperature=0)
    assert r.usage.completion_tokens >= 1
    assert "llava_gguf_requests_total{outcome=\"accepted\"}" in metrics(keyed, KEY)


def test_health_and_the_page_need_no_key(keyed):
    status, _, body = request(keyed, path="/health")
    assert status == 200 and json.loads(body)["api_key_required"] is True
    status, headers, body = request(keyed, path="/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert KEY.encode() not in body


# ---------------------------------------------------------------------------------------------- bad input
MAX_IMAGE_BYTES = 20000
SMALL_CTX = 128
MAX_IMAGES = 8  # run.py's ServeOptions.max_images: the per-request limit
MAX_BODY = body_limit(MAX_IMAGE_BYTES)  # the server's request body limit for these settings
IMAGE_URL = "messages[0].content[0].image_url.url"


@pytest.fixture(scope="module")
def strict(tiny_pair):
    llm, mmproj = tiny_pair
    with serve_process(llm, "--mmproj", mmproj, "--parallel", "1", "--threads", "2", "--model-alias", "tiny",
                       "--ctx", str(SMALL_CTX), "--max-image-bytes", str(MAX_IMAGE_BYTES)) as url:
        yield url


def noise_png(size: int) -> str:
    """A PNG that does not compress: size x size x 3 bytes and more."""
    return image_uri(Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but holds a few bytes: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def chat(*messages: dict, **fields) -> dict:
    return {"model": "tiny", "messages": list(messages), "max_tokens": 4, **fields}


BAD_BODIES = {
    # name: (body, status, code, param, words the message must hold)
    "bad base64": (lambda: chat(user_turn("Hi.", "data:image/png;base64,!!not*base64!!")), 400, "invalid_base64",
                   IMAGE_URL, ["base64"]),
    "not an image": (lambda: chat(user_turn("Hi.", "data:image/png;base64," + base64.b64encode(b"just some text, no "
                                                                                          b"pixels" * 4).decode())),
                     400, "invalid_image", IMAGE_URL, []),
    "image over --max-image-bytes": (lambda: chat(user_turn("Hi.", noise_png(128))), 413, "image_too_large", IMAGE_URL,
                                     [str(MAX_IMAGE_BYTES)]),
    "too many images": (lambda: chat(user_turn("Hi.", *[image_uri(sample_image(28, seed=i), "JPEG")
                                                   for i in range(MAX_IMAGES + 1)])),
                        400, "too_many_images", "messages", [str(MAX_IMAGES + 1), str(MAX_IMAGES)]),
    "unknown model": (lambda: {**chat(user_turn("Hi.")), "model": "gpt-4o"}, 404, "model_not_found", "model",
                      ["gpt-4o"]),
    "temperature a string": (lambda: chat(user_turn("Hi."), temperature="hot"), 400, "invalid_type", "temperature", []),
    "max_tokens not an integer": (lambda: chat(user_turn("Hi."), max_tokens=1.5), 400, "invalid_type", "max_tokens",
                                  []),
    "max_tokens zero": (lambda: chat(user_turn("Hi."), max_tokens=0), 400, None, "max_tokens", []),
    "messages not a list": (lambda: chat() | {"messages": "Hi."}, 400, "invalid_type", "messages", []),
    "messages missing": (lambda: {"model": "tiny"}, 400, "missing_required_parameter", "messages", []),
    "content a number": (lambda: chat({"role": "user", "content": 42}), 400, "invalid_type", "messages[0].content",
                         []),
    "unknown role": (lambda: chat({"role": "robot", "content": "Hi."}), 400, None, "messages[0].role", []),
    "n=2": (lambda: chat(user_turn("Hi."), n=2), 400, None, "n", []),
    "body an array": (lambda: [chat(user_turn("Hi."))], 400, None, None, []),
    "http URL without --allow-remote-images": (lambda: chat(user_turn("Hi.", "http://example.com/cat.png")), 400,
                                               "image_url_not_allowed", IMAGE_URL, ["--allow-remote-images"]),
    "file URL without --media-root": (lambda: chat(user_turn("Hi.", "file:///etc/hostname")), 400,
                                      "image_url_not_allowed", IMAGE_URL, ["--media-root"]),
    "unknown URL scheme": (lambda: chat(user_turn("Hi.", "ftp://example.com/cat.png")), 400, None, IMAGE_URL, []),
    "image header over the pixel limit": (lambda: chat(user_turn("Hi.", "data:image/png;base64," + base64.b64encode(
        png_header(40000, 40000)).decode())), 413, "image_too_large", IMAGE_URL, ["megapixels"]),
    # under Pillow's refusal (179 MP) but over its warning (89 MP): the CLI would decode it for seconds
    "image header of 100 megapixels": (lambda: chat(user_turn("Hi.", "data:image/png;base64," + base64.b64encode(
        png_header(10000, 10000)).decode())), 413, "image_too_large", IMAGE_URL, ["100 megapixels"]),
    "max_tokens past int32": (lambda: chat(user_turn("Hi."), max_tokens=2**40), 400, None, "max_tokens", []),
    "stream a string": (lambda: chat(user_turn("Hi."), stream="yes"), 400, "invalid_type", "stream", []),
    "seed a string": (lambda: chat(user_turn("Hi."), seed="42"), 400, "invalid_type", "seed", []),
    "five stop strings": (lambda: chat(user_turn("Hi."), stop=["a", "b", "c", "d", "e"]), 400, None, "stop", []),
    "empty messages": (lambda: chat() | {"messages": []}, 400, None, "messages", []),
    "image in an assistant message": (lambda: chat(user_turn("Hi."), {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}), 400, None,
        "messages[1].content[0]", []),
    "audio content part": (lambda: chat({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}),
                           400, "unsupported_value", "messages[0].content[0].type", []),
    "image_url without url": (lambda: chat({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}),
                              400, "invalid_type", IMAGE_URL, []),
    "data URI not base64": (lambda: chat(user_turn("Hi.", "data:image/png,%89PNG")), 400, "invalid_image_url",
                            IMAGE_URL, []),
    "text with a lone surrogate": (lambda: chat({"role": "user", "content": "Hi \ud800 there"}), 400, None,
                                   "messages[0].content", ["surrogate"]),
    "bad response_format": (lambda: chat(user_turn("Hi."), response_format={"type": "yaml"}), 400, None,
                            "response_format.type", []),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_request_body_gets_its_status_and_openai_error(strict, name):
    make, want, code, param, words = BAD_BODIES[name]
    status, _, body = request(strict, "POST", "/v1/chat/completions", make())
    err = openai_error(status, body, want, code, param)
    for w in words:
        assert w in err["message"], err


def test_context_overflow_names_both_numbers(strict):
    status, _, body = request(strict, "POST", "/v1/chat/completions", chat(user_turn("one two three four " * 60)))
    err = openai_error(status, body, 400, "context_length_exceeded", "messages")
    numbers = [int(n) for n in re.findall(r"\d+", err["message"])]
    assert SMALL_CTX in numbers, err
    assert any(n > SMALL_CTX for n in numbers), err  # what the prompt needs


def test_context_overflow_when_streaming_is_a_plain_400_not_an_event_stream(strict):
    status, headers, body = request(strict, "POST", "/v1/chat/completions",
                                    chat(user_turn("one two three four " * 60), stream=True))
    openai_error(status, body, 400, "context_length_exceeded", "messages")
    assert headers["content-type"].startswith("application/json")


def test_the_openai_client_gets_bad_request_error(strict):
    with pytest.raises(openai.BadRequestError) as caught:
        client(strict).chat.completions.create(model="tiny", messages=[user_turn("Hi.")], temperature=5)
    openai_error(caught.value.status_code, caught.value.response.content, 400, param="temperature")
    with pytest.raises(openai.NotFoundError) as caught:
        client(strict).chat.completions.create(model="no-such-model", messages=[user_turn("Hi.")])
    openai_error(caught.value.status_code, caught.value.response.content, 404, "model_not_found", "model")


@pytest.mark.parametrize("raw", [b'{"messages": [', b"\xff\xfe not utf-8", b"", b"null", b"[" * 100000 + b"]" * 100000,
                                 b'{"messages": ' + b'{"a": ' * 50000 + b"1" + b"}" * 50001],
                         ids=["truncated", "not utf-8", "empty", "null", "deep array", "deep object"])
def test_a_body_that_is_not_a_json_object_is_400(strict, raw):
    status, _, body = request(strict, "POST", "/v1/chat/completions", raw=raw)
    openai_error(status, body, 400)


def test_a_declared_body_over_the_limit_is_413_before_it_is_read(strict):
    parts = urllib.parse.urlsplit(strict)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(MAX_BODY + 1))
        conn.endheaders(b'{"messages": [')  # the rest is never sent: the answer must not wait for it
        r = conn.getresponse()
        err = openai_error(r.status, r.read(), 413, "request_too_large")
        assert str(MAX_BODY) in err["message"]
    finally:
        conn.close()


def test_a_chunked_body_over_the_limit_is_413(strict):
    parts = urllib.parse.urlsplit(strict)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    piece = b" " * (1 << 20)

    def body():
        yield b'{"messages": "'
        for _ in range(MAX_BODY // len(piece) + 2):
            yield piece

    try:
        try:
            conn.request("POST", "/v1/chat/completions", body=body(), encode_chunked=True,
                         headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the whole body was sent: the answer is still there
        r = conn.getresponse()
        openai_error(r.status, r.read(), 413, "request_too_large")
    finally:
        conn.close()


@pytest.mark.parametrize("method,path,want,code", [("GET", "/v1/nothing", 404, "not_found"),
                                                   ("POST", "/v1/completions", 404, "not_found"),
                                                   ("GET", "/v1/models/no-such-model", 404, "model_not_found"),
                                                   ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
                                                   ("DELETE", "/v1/models", 405, "method_not_allowed")])
def test_unknown_routes_and_methods_answer_openai_errors(strict, method, path, want, code):
    status, _, body = request(strict, method, path)
    openai_error(status, body, want, code)


def test_the_server_still_answers_after_the_bad_requests(strict, small_uri):
    r = client(strict).chat.completions.create(model="tiny", messages=[user_turn("Hi.", small_uri)], max_tokens=3,
                                               temperature=0)
    assert r.usage.completion_tokens >= 1


# ---------------------------------------------------------------------------------------------- SSRF, --media-root
class Recorder(http.server.BaseHTTPRequestHandler):
    """A real image server on loopback: it records every request it gets (there must be none)."""

    seen: list[str] = []
    png = b""

    def do_GET(self):  # noqa: N802 - http.server's name
        Recorder.seen.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.png)))
        self.end_headers()
        self.wfile.write(self.png)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    buf = io.BytesIO()
    sample_image(112, seed=5).save(buf, "PNG")
    Recorder.png, Recorder.seen = buf.getvalue(), []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """--media-root with an image inside, one outside and a symlink inside pointing outside."""
    base = tmp_path_factory.mktemp("media")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    image = sample_image(112, seed=5)
    image.save(root / "inside.png")
    image.save(outside / "secret.png")
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "dirlink").symlink_to(outside, target_is_directory=True)
    return root, outside, image


@pytest.fixture(scope="module")
def open_server(tiny_pair, media):
    llm, mmproj = tiny_pair
    with serve_process(llm, "--mmproj", mmproj, "--parallel", "1", "--threads", "2", "--model-alias", "tiny",
                       "--allow-remote-images", "--media-root", str(media[0])) as url:
        yield url


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.1", "0.0.0.0", "[::1]", "[::ffff:127.0.0.1]",
                                  "10.0.0.1", "169.254.169.254", "192.168.1.1"])
def test_ssrf_guard_refuses_loopback_private_and_link_local(open_server, image_server, host):
    before = len(Recorder.seen)
    status, _, body = request(open_server, "POST", "/v1/chat/completions",
                              chat(user_turn("Hi.", f"http://{host}:{image_server}/x.png")))
    err = openai_error(status, body, 400, "image_url_not_allowed", IMAGE_URL)
    assert "SSRF" in err["message"] or "not a public" in err["message"], err
    assert len(Recorder.seen) == before  # the image server never got a request


def test_the_loopback_image_server_itself_works(image_server):
    # the guard above is what refused: the same URL fetched directly answers
    conn = http.client.HTTPConnection("127.0.0.1", image_server, timeout=10)
    try:
        conn.request("GET", "/probe.png")
        r = conn.getresponse()
        assert r.status == 200 and r.read() == Recorder.png
    finally:
        conn.close()
    assert Recorder.seen[-1] == "/probe.png"
    Recorder.seen.clear()


def test_file_inside_media_root_answers_like_the_data_uri(open_server, media):
    root, _, image = media
    c = client(open_server)
    ask = dict(model="tiny", max_tokens=8, temperature=0)
    by_file = c.chat.completions.create(messages=[user_turn("What is this?", (root / "inside.png").as_uri())], **ask)
    by_data = c.chat.completions.create(messages=[user_turn("What is this?", image_uri(image))], **ask)
    assert by_file.choices[0].message.content == by_data.choices[0].message.content
    assert by_file.usage.prompt_tokens == by_data.usage.prompt_tokens > 64  # the image's rows were in both


@pytest.mark.parametrize("where", ["outside", "dotdot", "symlink", "dirlink", "missing"])
def test_file_outside_media_root_is_refused(open_server, media, where):
    root, outside, _ = media
    url = {"outside": (outside / "secret.png").as_uri(),
           "dotdot": f"file://{root}/../outside/secret.png",
           "symlink": (root / "link.png").as_uri(),
           "dirlink": (root / "dirlink" / "secret.png").as_uri(),
           "missing": (root / "nothing.png").as_uri()}[where]
    status, _, body = request(open_server, "POST", "/v1/chat/completions", chat(user_turn("Hi.", url)))
    err = openai_error(status, body, 400, param=IMAGE_URL)
    assert err["code"] == ("image_not_found" if where == "missing" else "image_url_not_allowed"), err
    assert str(outside) not in err["message"] or where == "outside", err  # where a link leads is not told


# ---------------------------------------------------------------------------------------------- JSON output, /metrics
# The shapes model never saw JSON: left free, it never closes a string (greedy, it writes words inside the first
# one until max_tokens). A bounded string lets the grammar close it, so the object ends and can be checked.
SCHEMA = {"type": "object", "properties": {"color": {"type": "string", "maxLength": 16}, "count": {"type": "integer"}},
          "required": ["color", "count"]}


@pytest.fixture(scope="module")
def shipped(shipped_gguf):
    with serve_process(shipped_gguf, "--parallel", "2", "--threads", "2", "--model-alias", "shapes") as url:
        yield url


def scene_question(i: int) -> tuple[str, str]:
    scene, question = shapes.questions("test", 40 + i, 1)[0]
    return image_uri(scene.image()), question.text


def test_json_schema_output_parses_and_validates(shipped):
    image, _ = scene_question(0)
    r = client(shipped).chat.completions.create(
        model="shapes", messages=[user_turn("What color is the shape, and how many shapes are there?", image)],
        temperature=0, max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA, "strict": True}})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    answer = json.loads(r.choices[0].message.content)
    jsonschema.validate(answer, SCHEMA)


def test_json_object_output_is_an_object(shipped):
    # any JSON object: nothing bounds its strings (see SCHEMA), so the answers are sampled (seeded) and those that
    # end on their own must parse; greedy, this model opens a key it never closes
    image, question = scene_question(1)
    finished = 0
    for seed in range(3):
        r = client(shipped).chat.completions.create(model="shapes", messages=[user_turn(question, image)],
                                                    temperature=1, seed=seed, max_tokens=60,
                                                    response_format={"type": "json_object"})
        content = r.choices[0].message.content
        assert content.lstrip().startswith("{"), content  # the grammar held from the first token
        if r.choices[0].finish_reason == "stop":
            finished += 1
            assert isinstance(json.loads(content), dict), content
    assert finished >= 1


def test_a_schema_that_is_not_an_object_is_400(shipped):
    status, _, body = request(shipped, "POST", "/v1/chat/completions", chat(user_turn("Hi."), response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}}) | {"model": "shapes"})
    openai_error(status, body, 400, param="response_format.json_schema.schema")


FAMILIES = {"llava_gguf_requests_total": "counter", "llava_gguf_prompt_tokens_total": "counter",
            "llava_gguf_completion_tokens_total": "counter", "llava_gguf_cached_tokens_total": "counter",
            "llava_gguf_images_encoded_total": "counter", "llava_gguf_queue_depth": "gauge",
            "llava_gguf_slot_state": "gauge", "llava_gguf_slot_cached_positions": "gauge"}


def test_metrics_is_prometheus_text_and_counts(shipped):
    status, _, body = request(shipped, path="/metrics")
    text = body.decode()
    for name, kind in FAMILIES.items():
        assert f"# HELP {name} " in text and f"# TYPE {name} {kind}\n" in text, name
    before = metrics(shipped)
    accepted = 'llava_gguf_requests_total{outcome="accepted"}'
    image, question = scene_question(2)  # an image no other test sent: encoded once, then from the cache
    ask = dict(model="shapes", messages=[user_turn(question, image)], temperature=0, max_tokens=8)
    first = client(shipped).chat.completions.create(**ask)
    mid = metrics(shipped)
    assert mid[accepted] == before[accepted] + 1
    assert mid["llava_gguf_prompt_tokens_total"] == before["llava_gguf_prompt_tokens_total"] + first.usage.prompt_tokens
    assert mid["llava_gguf_completion_tokens_total"] \
        == before["llava_gguf_completion_tokens_total"] + first.usage.completion_tokens
    assert mid["llava_gguf_images_encoded_total"] == before["llava_gguf_images_encoded_total"] + 1
    second = client(shipped).chat.completions.create(**ask)
    after = metrics(shipped)
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert after["llava_gguf_cached_tokens_total"] \
        == mid["llava_gguf_cached_tokens_total"] + second.usage.prompt_tokens_details.cached_tokens
    assert after["llava_gguf_images_encoded_total"] == mid["llava_gguf_images_encoded_total"]  # the cache's
    assert after[accepted] == before[accepted] + 2
    assert after["llava_gguf_queue_depth"] == 0
    for slot in ("0", "1"):  # each sequence in exactly one state, idle now
        states = {k: v for k, v in after.items() if k.startswith(f'llava_gguf_slot_state{{slot="{slot}"')}
        assert len(states) >= 2 and sum(states.values()) == 1, states
        assert states[f'llava_gguf_slot_state{{slot="{slot}",state="idle"}}'] == 1
        assert f'llava_gguf_slot_cached_positions{{slot="{slot}"}}' in after
