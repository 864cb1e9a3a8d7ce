"""serve/protocol.py and serve/errors.py: a chat completion body checked into messages, images and sampling
settings, every bad input an ApiError with its status, field and code in OpenAI's error shape. No model, no
network: images are data: URIs and files under a temporary --media-root."""
from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from llava_gguf.runtime.prompt import Message
from llava_gguf.runtime.sampling import Sampling
from llava_gguf.serve.errors import ApiError, check_model, context_length_exceeded, overloaded, unauthorized
from llava_gguf.serve.protocol import ChatRequest, ImagePolicy, parse_chat_request
from llava_gguf.settings import SAMPLING_DEFAULTS

POLICY = ImagePolicy()
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def png(colour=(255, 0, 0), size=(8, 6), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_part(url) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*content) -> dict:
    return {"role": "user", "content": list(content) if len(content) != 1 or not isinstance(content[0], str)
            else content[0]}


def parse(body, **kw) -> ChatRequest:
    return parse_chat_request(body, policy=kw.pop("policy", POLICY), **kw)


def refused(body, status=400, param=None, code=None, *words, **kw) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body, **kw)
    e = info.value
    assert (e.status, e.param) == (status, param), e.body()
    if code is not None:
        assert e.code == code, e.body()
    body_ = e.body()
    assert set(body_) == {"error"} and set(body_["error"]) == {"message", "type", "param", "code"}
    assert body_["error"]["type"] == "invalid_request_error"
    assert "\n" not in e.message and "Traceback" not in e.message
    json.dumps(body_)  # it goes on the wire as it is
    for w in words:
        assert w.lower() in e.message.lower(), e.message
    return e


# ---- good requests


def test_defaults_are_the_shared_table():
    r = parse({"messages": [user("hi")]})
    assert r.sampling == Sampling()
    assert {k: getattr(r.sampling, k) for k in SAMPLING_DEFAULTS} == SAMPLING_DEFAULTS
    assert (r.model, r.stream, r.include_usage, r.grammar, r.images) == (None, False, False, None, ())
    assert r.messages == (Message("user", "hi", 0),)


def test_every_sampling_field_is_taken():
    r = parse({"messages": [user("hi")], "max_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 3,
               "min_p": 0.1, "repeat_penalty": 1.3, "seed": 42, "stop": ["\n", "END"], "n": 1,
               "presence_penalty": 0, "frequency_penalty": None, "logprobs": False, "tool_choice": "none",
               "tools": [], "user": "someone", "metadata": {"x": 1}, "unknown_field": [1, 2]})
    assert r.sampling == Sampling(7, 0.0, 0.5, 3, 0.1, 1.3, ("\n", "END"), 42)


def test_max_completion_tokens_wins_and_null_means_default():
    assert parse({"messages": [user("x")], "max_tokens": 5, "max_completion_tokens": 9}).sampling.max_tokens == 9
    assert parse({"messages": [user("x")], "max_tokens": 5, "max_completion_tokens": None}).sampling.max_tokens == 5
    assert parse({"messages": [user("x")], "max_tokens": None}).sampling.max_tokens == SAMPLING_DEFAULTS["max_tokens"]
    assert parse({"messages": [user("x")], "stop": "###"}).sampling.stop == ("###",)
    assert parse({"messages": [user("x")], "seed": -1}).sampling.seed is None


def test_roles_content_parts_and_image_order():
    red, green, blue = (data_uri(png(c)) for c in COLOURS)
    r = parse({"model": "llava", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        user(image_part(red), {"type": "text", "text": "what is this?"}),
        {"role": "assistant", "content": "a red square"},
        {"role": "assistant", "content": None},
        user({"type": "text", "text": "and"}, image_part(green), {"type": "text", "text": "these?"},
             {"type": "image_url", "image_url": blue, "detail": "high"}),  # image_url as a plain string
    ]})
    assert r.model == "llava"
    assert r.messages == (Message("system", "be brief"), Message("user", "what is this?", 1),
                          Message("assistant", "a red square"), Message("assistant", ""),
                          Message("user", "and\nthese?", 2))
    assert [img.getpixel((0, 0)) for img in r.images] == COLOURS
    assert all(img.mode == "RGB" and img.size == (8, 6) for img in r.images)


def test_system_prompt_is_prepended_only_when_the_request_has_none():
    r = parse({"messages": [user("hi")]}, system="You are terse.")
    assert r.messages == (Message("system", "You are terse."), Message("user", "hi"))
    r = parse({"messages": [{"role": "system", "content": "mine"}, user("hi")]}, system="You are terse.")
    assert r.messages[0] == Message("system", "mine") and len(r.messages) == 2


def test_model_alias_names_a_request_without_model():
    assert parse({"messages": [user("x")]}, model_alias="shapes").model == "shapes"
    assert parse({"messages": [user("x")], "model": "gpt-4o"}, model_alias="shapes").model == "gpt-4o"


def test_stream_options():
    r = parse({"messages": [user("x")], "stream": True, "stream_options": {"include_usage": True}})
    assert (r.stream, r.include_usage) == (True, True)
    assert parse({"messages": [user("x")], "stream": True}).include_usage is False


def test_file_urls_under_the_media_root(tmp_path):
    (tmp_path / "a.png").write_bytes(png((0, 0, 255)))
    r = parse({"messages": [user(image_part((tmp_path / "a.png").as_uri()))]},
              policy=ImagePolicy(media_root=tmp_path))
    assert r.images[0].getpixel((0, 0)) == (0, 0, 255)


def test_a_jpeg_and_url_safe_base64_with_line_breaks():
    raw = png((10, 200, 30), (32, 32), "JPEG")
    wrapped = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    wrapped = "\n".join(wrapped[i:i + 76] for i in range(0, len(wrapped), 76))
    r = parse({"messages": [user(image_part("data:image/jpeg;base64," + wrapped))]})
    assert r.images[0].size == (32, 32)


# ---- bad requests: status, param, code


@pytest.mark.parametrize("body", [None, [], "text", 3])
def test_body_must_be_an_object(body):
    refused(body, 400, None, None, "JSON object")


@pytest.mark.parametrize("body,param,code", [
    ({}, "messages", "missing_required_parameter"),
    ({"messages": None}, "messages", "missing_required_parameter"),
    ({"messages": []}, "messages", "empty_array"),
    ({"messages": "hi"}, "messages", "invalid_type"),
    ({"messages": ["hi"]}, "messages[0]", "invalid_type"),
    ({"messages": [{"content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role", "unsupported_value"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role", "unsupported_value"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "missing_required_parameter"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content[0]", "invalid_type"),
    ({"messages": [user({"type": "text", "text": 3})]}, "messages[0].content[0].text", "invalid_type"),
    ({"messages": [user({"type": "video"})]}, "messages[0].content[0].type", "invalid_value"),
    ({"messages": [user({"type": "input_audio", "input_audio": {}})]}, "messages[0].content[0].type",
     "unsupported_value"),
    ({"messages": [user({"type": "image_url", "image_url": {}})]}, "messages[0].content[0].image_url.url",
     "invalid_type"),
    ({"messages": [{"role": "assistant", "content": [image_part("data:,")]}]}, "messages[0].content[0]",
     "invalid_value"),
    ({"messages": [{"role": "system", "content": [image_part("data:,")]}]}, "messages[0].content[0]",
     "invalid_value"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
     "messages[0].tool_calls", "unsupported_value"),
    ({"messages": [user("a\ud800b")]}, "messages[0].content", "invalid_value"),
    ({"messages": [user({"type": "text", "text": "ok"}, {"type": "text", "text": "\udc80"})]},
     "messages[0].content", "invalid_value"),
])
def test_bad_messages(body, param, code):
    refused(body, 400, param, code)


def body_with(**fields) -> dict:
    return {"messages": [user("x")], **fields}


@pytest.mark.parametrize("fields,param,code", [
    (dict(temperature="hot"), "temperature", "invalid_type"),
    (dict(temperature=True), "temperature", "invalid_type"),
    (dict(temperature=2.5), "temperature", "invalid_value"),
    (dict(temperature=-0.1), "temperature", "invalid_value"),
    (dict(max_tokens=1.5), "max_tokens", "invalid_type"),
    (dict(max_tokens=True), "max_tokens", "invalid_type"),
    (dict(max_tokens="10"), "max_tokens", "invalid_type"),
    (dict(max_tokens=0), "max_tokens", "invalid_value"),
    (dict(max_completion_tokens=-3), "max_completion_tokens", "invalid_value"),
    (dict(max_tokens=2**40), "max_tokens", "invalid_value"),
    (dict(top_p=1.5), "top_p", "invalid_value"),
    (dict(top_p=[0.5]), "top_p", "invalid_type"),
    (dict(top_k=-1), "top_k", "invalid_value"),
    (dict(top_k=0.5), "top_k", "invalid_type"),
    (dict(min_p=2), "min_p", "invalid_value"),
    (dict(repeat_penalty=0), "repeat_penalty", "invalid_value"),
    (dict(seed=2**40), "seed", "invalid_value"),
    (dict(seed="7"), "seed", "invalid_type"),
    (dict(stop=3), "stop", "invalid_type"),
    (dict(stop=["a", 3]), "stop", "invalid_type"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop", "invalid_value"),
    (dict(stop=["a", ""]), "stop", "invalid_value"),
    (dict(stop="\ud800"), "stop", "invalid_value"),
    (dict(n=2), "n", "unsupported_value"),
    (dict(n="1"), "n", "invalid_type"),
    (dict(presence_penalty=0.5), "presence_penalty", "unsupported_value"),
    (dict(frequency_penalty=-1), "frequency_penalty", "unsupported_value"),
    (dict(frequency_penalty="x"), "frequency_penalty", "invalid_type"),
    (dict(logprobs=True), "logprobs", "unsupported_value"),
    (dict(logprobs="yes"), "logprobs", "invalid_type"),
    (dict(top_logprobs=3), "top_logprobs", "unsupported_value"),
    (dict(logit_bias={"42": 5}), "logit_bias", "unsupported_value"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", "unsupported_value"),
    (dict(tool_choice="auto"), "tool_choice", "unsupported_value"),
    (dict(functions=[{"name": "f"}]), "functions", "unsupported_value"),
    (dict(stream="yes"), "stream", "invalid_type"),
    (dict(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
    (dict(stream=True, stream_options=[1]), "stream_options", "invalid_type"),
    (dict(stream=True, stream_options={"include_usage": 1}), "stream_options.include_usage", "invalid_type"),
    (dict(model=3), "model", "invalid_type"),
    (dict(response_format="json"), "response_format", "invalid_type"),
    (dict(response_format={"type": "xml"}), "response_format.type", "invalid_value"),
])
def test_bad_fields(fields, param, code):
    e = refused(body_with(**fields), 400, param, code)
    assert param in e.message and "--" not in e.message  # names the field, not a CLI option


def test_messages_name_the_request_field_not_the_cli_option():
    e = refused(body_with(max_completion_tokens=0), 400, "max_completion_tokens", "invalid_value")
    assert "'max_completion_tokens' must be from 1" in e.message
    e = refused(body_with(top_p=3), 400, "top_p", "invalid_value")
    assert e.message.startswith("top_p must be a number from 0 to 1") and "(--top-p)" not in e.message


# ---- bad images


def test_bad_base64_and_not_an_image():
    param = "messages[1].content[1].image_url.url"
    body = {"messages": [user("x"), user({"type": "text", "text": "see"}, image_part("data:image/png;base64,@@@"))]}
    refused(body, 400, param, "invalid_base64", "base64")
    body["messages"][1]["content"][1] = image_part(data_uri(b"this is not a picture at all"))
    refused(body, 400, param, "invalid_image", "not an image")
    body["messages"][1]["content"][1] = image_part(data_uri(png()[:40]))  # a truncated PNG
    refused(body, 400, param, "invalid_image")
    body["messages"][1]["content"][1] = image_part("data:text/plain,hello")
    refused(body, 400, param, "invalid_image_url", "base64")
    body["messages"][1]["content"][1] = image_part("data:image/png;base64,")
    refused(body, 400, param, "invalid_image")


@pytest.mark.parametrize("url,code,words", [
    ("ftp://example.com/a.png", "invalid_image_url", "data:image"),
    ("/etc/passwd", "invalid_image_url", "data:image"),
    ("", "invalid_image_url", "data:image"),
    ("http://example.com/a.png", "image_url_not_allowed", "--allow-remote-images"),
    ("HTTPS://example.com/a.png", "image_url_not_allowed", "--allow-remote-images"),
    ("file:///etc/hostname", "image_url_not_allowed", "--media-root"),
])
def test_urls_the_default_policy_refuses(url, code, words):
    refused({"messages": [user(image_part(url))]}, 400, "messages[0].content[0].image_url.url", code, words)


def test_image_too_large_is_413_before_decoding():
    policy = ImagePolicy(max_bytes=1000)
    big = png(size=(300, 300), fmt="BMP")
    assert len(big) > 1000
    e = refused({"messages": [user(image_part(data_uri(big)))]}, 413, "messages[0].content[0].image_url.url",
                "image_too_large", "1000", policy=policy)
    assert e.body()["error"]["type"] == "invalid_request_error"
    assert parse({"messages": [user(image_part(data_uri(png())))]}, policy=policy).images


def test_too_many_images():
    url = data_uri(png())
    parse({"messages": [user(*[image_part(url)] * 2)]}, policy=ImagePolicy(max_images=2))
    refused({"messages": [user(image_part(url)), user(*[image_part(url)] * 2)]}, 400, "messages",
            "too_many_images", "3", "2", policy=ImagePolicy(max_images=2))


def declared(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels."""
    big = png(size=(1, 1))
    ihdr = big.index(b"IHDR")
    chunk = b"IHDR" + struct.pack(">II", width, height) + big[ihdr + 12:ihdr + 17]
    return big[:ihdr - 4] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + big[ihdr + 21:]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the server filters it too
def test_a_decompression_bomb_is_a_413_from_its_header():
    # more pixels than Pillow refuses (400 MP), and between its warning (89 MP) and its refusal: both refused
    # from the header, before any pixel is decoded (a few bytes can declare what takes seconds to decode)
    for w, h, mp in ((20000, 20000, "400"), (10000, 10000, "100")):
        refused({"messages": [user(image_part(data_uri(declared(w, h))))]}, 413,
                "messages[0].content[0].image_url.url", "image_too_large", f"{mp} megapixels")
    # under the server's limit the same kind of file is decoded, and found damaged
    refused({"messages": [user(image_part(data_uri(declared(4000, 4000))))]}, 400,
            "messages[0].content[0].image_url.url", "invalid_image")
    refused({"messages": [user(image_part(data_uri(declared(200, 200))))]}, 413,
            "messages[0].content[0].image_url.url", "image_too_large", policy=ImagePolicy(max_pixels=100 * 100))


def test_checks_run_before_any_image_is_fetched(tmp_path):
    # a bad field after a slow or remote image: refused without touching the image
    e = refused({"messages": [user(image_part("http://203.0.113.1/a.png"))], "temperature": "x"},
                400, "temperature", "invalid_type", policy=ImagePolicy(allow_remote=True, timeout=30))
    assert "image" not in e.message


# ---- the other errors the server sends


def test_check_model():
    check_model(None, {"shapes"})
    check_model("shapes", {"shapes", "model.gguf"})
    with pytest.raises(ApiError) as info:
        check_model("gpt-4o", {"shapes", "model.gguf"})
    e = info.value
    assert (e.status, e.param, e.code, e.type) == (404, "model", "model_not_found", "invalid_request_error")
    assert "gpt-4o" in e.message and "'shapes'" in e.message


def test_an_unknown_model_is_refused_before_any_image_is_fetched():
    body = {"model": "gpt-4o", "messages": [user(image_part("http://203.0.113.1/a.png"))]}
    policy = ImagePolicy(allow_remote=True, timeout=30)  # a fetch would hang on this documentation address
    with pytest.raises(ApiError) as info:
        parse(body, policy=policy, served={"shapes"})
    assert (info.value.status, info.value.code, info.value.param) == (404, "model_not_found", "model")
    assert parse({"model": "shapes", "messages": [user("x")]}, served={"shapes"}).model == "shapes"
    assert parse({"messages": [user("x")]}, served={"shapes"}, model_alias="shapes").model == "shapes"


def test_auth_overload_and_context_errors():
    e = unauthorized()
    assert (e.status, e.code, e.headers) == (401, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
    e = overloaded(3)
    assert (e.status, e.type, e.code, e.headers["Retry-After"]) == (503, "service_unavailable_error",
                                                                     "server_is_overloaded", "3")
    e = context_length_exceeded(5000, 4096)
    assert (e.status, e.param, e.code) == (400, "messages", "context_length_exceeded")
    assert "4096" in e.message and "5000" in e.message
    e = ApiError(500, "boom\n  at line 3")
    assert e.type == "server_error" and e.message == "boom at line 3"
    assert ApiError(429, "slow down").type == "rate_limit_error"


# ---- anything a client can send: a ChatRequest or an ApiError, never another exception

ODD = st.sampled_from([None, True, False, 0, 1, -1, 1.5, 2**63, float("nan"), float("inf"), "", "x", "\ud800", [], {},
                       "user", "assistant", "tool", "text", "image_url", "data:image/png;base64,AAAA", "data:,",
                       "file:///etc/passwd", "http://127.0.0.1/x.png", data_uri(png())])
JSON = st.recursive(ODD | st.text(max_size=8) | st.integers() | st.floats(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=12)
KEYS = st.sampled_from(["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                        "min_p", "repeat_penalty", "seed", "stop", "n", "stream", "stream_options", "logprobs",
                        "tools", "tool_choice", "response_format", "presence_penalty", "frequency_penalty"])
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio"]) | JSON},
                             optional={"text": JSON, "image_url": JSON | st.fixed_dictionaries({"url": ODD})})
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer", "tool"]) | JSON},
                                optional={"content": ODD | st.lists(PART, max_size=3) | JSON, "tool_calls": JSON})
BODY = st.dictionaries(KEYS, JSON, max_size=6).flatmap(
    lambda d: st.lists(MESSAGE, max_size=3).map(lambda ms: {**d, "messages": ms}) | st.just(d))


@given(body=BODY | JSON)
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_body_is_a_request_or_an_api_error(body):
    try:
        r = parse(body, policy=ImagePolicy(timeout=0.5))
    except ApiError as e:
        assert 400 <= e.status < 500 and e.body()["error"]["type"] == "invalid_request_error"
        assert "\n" not in e.message and e.message
        json.dumps(e.body())
    else:
        assert isinstance(r, ChatRequest) and r.messages and isinstance(r.sampling, Sampling)


def test_nan_and_infinity_are_said_as_such():
    # Python's json reads NaN and Infinity: the message must not say "expected a number, got a number"
    for v in ("NaN", "Infinity", "-Infinity"):
        e = refused(json.loads('{"messages": [{"role": "user", "content": "hi"}], "top_p": %s}' % v), 400, "top_p",
                    "invalid_type", "finite")
        assert "got a number" not in e.message
