"""The server's one error type: an HTTP status and OpenAI's error body (`{"error": {"message", "type", "param",
"code"}}`), raised by request parsing, image fetching and the app alike, and answered as it is.

`type` follows what api.openai.com sends, not llama-server's names (llama-server says "authentication_error",
"not_found_error", "unavailable_error" and puts the HTTP status in `code`): OpenAI answers a bad key (401) and an
unknown model (404) with "invalid_request_error" and says which in `code` ("invalid_api_key", "model_not_found"),
a rate limit (429) with "rate_limit_error" ("rate_limit_exceeded") and an overloaded service (503) with
"service_unavailable_error" ("server_is_overloaded"). Clients (the `openai` package among them) pick their
exception class from the HTTP status alone, so the status is what must be right; the body is for people."""
from __future__ import annotations

# OpenAI's error type for each status this server sends (anything else: a server error)
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
               404: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable_error"}


def one_line(text: str, limit: int = 500) -> str:
    """A message as one line of at most `limit` characters (a client's value quoted in it can be anything)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class ApiError(Exception):
    """A request the server answers with `status` and OpenAI's error body. `param` names the field in the
    request (`messages[1].content[0].image_url.url`), `code` says what is wrong in a word a client can test
    ("invalid_type", "image_too_large", ...), `headers` go on the response (Retry-After, WWW-Authenticate)."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        self.status = int(status)
        self.message = one_line(message)
        self.type = type or ERROR_TYPES.get(self.status, "server_error")
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        super().__init__(self.message)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"


def invalid(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    """400: a field with a wrong type or value."""
    return ApiError(400, message, param=param, code=code)


def unsupported(param: str, what: str) -> ApiError:
    """400: a field OpenAI has that this server does not do (rather than silently ignoring it)."""
    return ApiError(400, f"{param}: {what} is not supported by this server", param=param, code="unsupported_value")


def unauthorized(message: str = "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'") -> ApiError:
    """401, with the challenge RFC 6750 asks for."""
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def overloaded(retry_after: int = 1, message: str | None = None) -> ApiError:
    """503 with Retry-After: every sequence is busy and the queue is full."""
    return ApiError(503, message or "the server is busy (every sequence is in use and the queue is full); "
                    f"retry in {retry_after} s", code="server_is_overloaded",
                    headers={"Retry-After": str(max(1, int(retry_after)))})


def context_length_exceeded(prompt_tokens: int, n_ctx: int) -> ApiError:
    """400 with the numbers, as OpenAI words it."""
    return ApiError(400, f"This model's maximum context length is {n_ctx} tokens. However, your messages "
                    f"resulted in {prompt_tokens} tokens (text tokens and image rows). Please reduce the length "
                    "of the messages or the number of images.", param="messages", code="context_length_exceeded")


def check_model(name: str | None, served: set[str] | frozenset[str]) -> None:
    """404 unless `name` (the request's `model`; None: not given) is a name this server answers to."""
    if name is None or name in served:
        return
    names = ", ".join(repr(s) for s in sorted(served))
    raise ApiError(404, f"The model {one_line(name, 200)!r} does not exist on this server; it serves {names}",
                   param="model", code="model_not_found")
