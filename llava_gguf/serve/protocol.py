"""A `POST /v1/chat/completions` body, checked and turned into what the runtime takes (serve layer, request
side): messages (a message's images before its text, as LLaVA was trained), decoded RGB images in order,
sampling settings (a field the request leaves out takes SAMPLING_DEFAULTS, the table `chat` and `batch` use)
and the grammar for `response_format`. Anything wrong is an ApiError naming the field, in OpenAI's shape;
fields OpenAI has that this server does not do are refused rather than silently ignored; unknown fields are
ignored, as OpenAI-compatible servers do. Blocking (it may fetch and decode images): call it off the event loop."""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

from PIL import Image

from llava_gguf.errors import LlavaGgufError
from llava_gguf.runtime.images import load_image
from llava_gguf.runtime.prompt import Message
from llava_gguf.runtime.sampling import Sampling, check_text, is_int, is_number, sampling_settings
from llava_gguf.serve.errors import (ApiError, check_model, context_length_exceeded, invalid, one_line, overloaded,
                                     unauthorized, unsupported)
from llava_gguf.serve.fetch import ImagePolicy, image_bytes, public_address
from llava_gguf.serve.grammar import grammar_for

__all__ = ["ApiError", "ChatRequest", "ImagePolicy", "check_model", "context_length_exceeded", "overloaded",
           "parse_chat_request", "public_address", "unauthorized"]

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
INT_MAX = 2**31 - 1  # llama.cpp takes counts as int32
MAX_STOPS = 4  # OpenAI's limit


@dataclass(frozen=True)
class ChatRequest:
    model: str | None  # the request's `model`, or the server's alias when it gave none
    messages: tuple[Message, ...]
    images: tuple[object, ...]  # PIL RGB images, in the order their messages place them
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with `usage`
    grammar: str | None = None  # GBNF the answer must follow (response_format)


@dataclass(frozen=True)
class _Part:
    """One content part before its image is fetched: text, or an image URL and the field naming it."""
    text: str | None = None
    url: str | None = None
    param: str | None = None


def _type_name(value: object) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} (not a finite number)"  # Python's json reads NaN and Infinity
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _wrong_type(param: str, expected: str, value: object) -> ApiError:
    return invalid(f"Invalid type for '{param}': expected {expected}, but got {_type_name(value)} instead",
                   param, "invalid_type")


def _field(body: dict, key: str, kind: str):
    """body[key] checked to be of `kind` (int, number, bool, str), or None when absent or null."""
    value = body.get(key)
    if value is None:
        return None
    ok = {"int": is_int, "number": is_number, "bool": lambda v: isinstance(v, bool),
          "str": lambda v: isinstance(v, str)}[kind]
    if not ok(value):
        expected = {"int": "an integer", "number": "a finite number", "bool": "a boolean", "str": "a string"}[kind]
        raise _wrong_type(key, expected, value)
    return value


def _in_range(key: str, value, low, high) -> None:
    if value is not None and not low <= value <= high:
        raise invalid(f"'{key}' must be from {low} to {high}, not {one_line(repr(value), 40)}", key)


def _cli_free(message: str) -> str:
    """A runtime message without the CLI options it names ("temperature (--temp) must ...")."""
    return re.sub(r"\s*\(--[a-z-]+\)", "", message)


def _sampling(body: dict) -> Sampling:
    """The sampling settings, each field type-checked here and range-checked by the shared sampling_settings."""
    settings: dict[str, object] = {}
    names: dict[str, str] = {}  # sampling_settings' keyword -> the request's field
    for key in ("max_tokens", "max_completion_tokens"):  # the newer name wins when both are given
        value = _field(body, key, "int")
        if value is not None:
            settings["max_tokens"], names["max_tokens"] = value, key
    for key, kind in (("temperature", "number"), ("top_p", "number"), ("top_k", "int"), ("min_p", "number"),
                      ("repeat_penalty", "number"), ("seed", "int")):
        value = _field(body, key, kind)
        if value is not None:
            settings[key], names[key] = value, key
    _in_range("temperature", settings.get("temperature"), 0, 2)  # OpenAI's range
    _in_range(names.get("max_tokens", "max_tokens"), settings.get("max_tokens"), 1, INT_MAX)
    _in_range("top_k", settings.get("top_k"), 0, INT_MAX)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _wrong_type("stop", "a string or an array of strings", stop)
        if len(stops) > MAX_STOPS:
            raise invalid(f"'stop' takes at most {MAX_STOPS} strings, not {len(stops)}", "stop")
        settings["stop"], names["stop"] = stops, "stop"
    for key, value in settings.items():  # one at a time: the error names the field that is wrong
        try:
            sampling_settings(**{key: value})
        except LlavaGgufError as e:
            message = _cli_free(e.one_line())
            message = names[key] + message[len(key):] if message.startswith(key) else f"'{names[key]}': {message}"
            raise invalid(message, names[key]) from None
    return sampling_settings(**settings)


def _refuse_unsupported(body: dict) -> None:
    n = _field(body, "n", "int")
    if n is not None and n != 1:
        raise invalid(f"'n' must be 1 (this server generates one choice per request), not {n}", "n",
                      "unsupported_value")
    for key in ("presence_penalty", "frequency_penalty"):
        value = _field(body, key, "number")
        if value:
            raise unsupported(key, f"a non-zero {key} (use the repeat_penalty extension)")
    if _field(body, "logprobs", "bool"):
        raise unsupported("logprobs", "logprobs true")
    if body.get("top_logprobs"):
        raise unsupported("top_logprobs", "top_logprobs")
    if body.get("logit_bias"):
        raise unsupported("logit_bias", "logit_bias")
    if body.get("tools") or body.get("functions"):
        key = "tools" if body.get("tools") else "functions"
        raise unsupported(key, "tool calling")
    for key in ("tool_choice", "function_call"):
        if body.get(key) not in (None, "none"):
            raise unsupported(key, f"{key} other than \"none\"")


def _parts(content: object, role: str, where: str) -> list[_Part]:
    """A message's content as parts; images only in user messages."""
    if isinstance(content, str):
        return [_Part(text=content)]
    if content is None:
        if role == "assistant":  # an assistant turn that only called tools has null content
            return [_Part(text="")]
        raise invalid(f"'{where}' is null; only an assistant message may have no content", where,
                      "missing_required_parameter")
    if not isinstance(content, list):
        raise _wrong_type(where, "a string or an array of content parts", content)
    parts = []
    for j, part in enumerate(content):
        p = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise _wrong_type(p, "an object", part)
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _wrong_type(f"{p}.text", "a string", text)
            parts.append(_Part(text=text))
        elif kind == "image_url":
            if role != "user":
                raise invalid(f"'{p}': images are only allowed in user messages, not in a {role} message", p)
            image = part.get("image_url")
            url, param = (image, f"{p}.image_url") if isinstance(image, str) else (
                image.get("url") if isinstance(image, dict) else None, f"{p}.image_url.url")
            if not isinstance(url, str):
                raise _wrong_type(param, "a string (a data: URI or URL)", url)
            parts.append(_Part(url=url, param=param))
        elif kind in ("input_audio", "file", "refusal", "image_file", "input_image"):
            raise unsupported(f"{p}.type", f"a {kind!r} content part")
        else:
            raise invalid(f"'{p}.type' must be \"text\" or \"image_url\", not {one_line(repr(kind), 40)}",
                          f"{p}.type")
    return parts


def _messages(body: dict) -> list[tuple[str, list[_Part], str]]:
    """(role, parts, field name) for each message, structure checked (no image fetched yet)."""
    if "messages" not in body or body["messages"] is None:
        raise invalid("Missing required parameter: 'messages'", "messages", "missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array of messages", messages)
    if not messages:
        raise invalid("'messages' must hold at least one message", "messages", "empty_array")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _wrong_type(where, "an object", m)
        role = m.get("role")
        if role in ("tool", "function"):
            raise unsupported(f"{where}.role", f"a {role!r} message (tool calling)")
        if not isinstance(role, str) or role not in ROLES:
            raise invalid(f"'{where}.role' must be one of \"system\", \"developer\", \"user\", \"assistant\", not "
                          f"{one_line(repr(role), 40)}", f"{where}.role")
        if role == "assistant" and m.get("tool_calls"):
            raise unsupported(f"{where}.tool_calls", "tool calling")
        out.append((ROLES[role], _parts(m.get("content"), ROLES[role], f"{where}.content"), f"{where}.content"))
    return out


def _pixels(data: bytes) -> int | None:
    """The pixel count an image's header declares (nothing decoded), or None when Pillow cannot say."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
    except Image.DecompressionBombError as e:  # over twice the warning limit: Pillow refuses to open it
        found = re.search(r"\((\d+) pixels\)", str(e))
        return int(found.group(1)) if found else 2**62
    except Exception:  # noqa: BLE001 - not readable here: load_image says why, in its words
        return None
    return w * h


def _decode(part: _Part, policy: ImagePolicy):
    data = image_bytes(part.url, policy, part.param)
    n = _pixels(data)
    if n is not None and n > policy.max_pixels:
        raise ApiError(413, f"{part.param}: the image is {n / 1e6:.0f} megapixels, above this server's limit of "
                       f"{policy.max_pixels / 1e6:.0f} (scale it down first)", param=part.param, code="image_too_large")
    try:
        return load_image(data)
    except LlavaGgufError as e:
        raise invalid(f"{part.param}: {e.one_line().replace('the image bytes', 'the data')}", part.param,
                      "invalid_image") from None


def _stream(body: dict) -> tuple[bool, bool]:
    stream = bool(_field(body, "stream", "bool"))
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if not isinstance(options, dict):
        raise _wrong_type("stream_options", "an object", options)
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise _wrong_type("stream_options.include_usage", "a boolean", include)
    return stream, bool(include)


def parse_chat_request(body: object, *, policy: ImagePolicy, system: str | None = None,
                       model_alias: str | None = None, served: set[str] | frozenset[str] | None = None) -> ChatRequest:
    """A chat completion request, checked: ApiError (400, 413; 404 for a `model` not in `served`, when given)
    on anything wrong, naming the field. `system` (--system) is put first when the request has no system
    message; `model_alias` is the model name when the request gives none. Every cheap check runs before any
    image is fetched or decoded."""
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, not {_type_name(body)}", None)
    model = _field(body, "model", "str")
    if served is not None:
        check_model(model, served)
    _refuse_unsupported(body)
    sampling = _sampling(body)
    stream, include_usage = _stream(body)
    grammar = grammar_for(body.get("response_format"))
    parsed = _messages(body)
    wanted = [p for _, parts, _ in parsed for p in parts if p.url is not None]
    if len(wanted) > policy.max_images:
        raise invalid(f"the request has {len(wanted)} images, above this server's limit of {policy.max_images}",
                      "messages", "too_many_images")
    messages: list[Message] = []
    for role, parts, where in parsed:
        texts = [p.text for p in parts if p.text is not None]
        text = "\n".join(texts)
        try:
            check_text(text, f"'{where}'")
        except LlavaGgufError as e:
            raise invalid(e.one_line(), where) from None
        messages.append(Message(role, text, sum(p.url is not None for p in parts)))
    images = tuple(_decode(p, policy) for p in wanted)  # after every cheap check: a bad field costs no fetch
    if system is not None and not any(m.role == "system" for m in messages):
        messages.insert(0, Message("system", system))
    return ChatRequest(model if model is not None else model_alias, tuple(messages), images, sampling, stream,
                       include_usage, grammar)
