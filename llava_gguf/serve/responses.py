"""What the server sends, as plain data: OpenAI's chat.completion and chat.completion.chunk objects, the usage
block (with how much of the prompt came from the cache), a failed request as OpenAI's error, and /metrics
in Prometheus' text format. Pure functions: app.py puts them on the wire."""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field

from llava_gguf.serve.errors import ApiError, context_length_exceeded, overloaded
from llava_gguf.runtime.scheduler import Counters, Done, Failed


@dataclass
class Completion:
    """One response's identity: OpenAI's id, creation time and model name, the same in every chunk."""

    model: str
    id: str = field(default_factory=lambda: "chatcmpl-" + secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "llava-gguf"}

    def chunk(self, delta: dict, finish_reason: str | None = None, include_usage: bool = False) -> dict:
        out = self.head("chat.completion.chunk")
        out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        if include_usage:
            out["usage"] = None  # OpenAI: null on every chunk but the last
        return out

    def usage_chunk(self, done: Done) -> dict:
        out = self.head("chat.completion.chunk")
        out["choices"] = []
        out["usage"] = usage(done)
        out["timings"] = timings(done)
        return out

    def whole(self, text: str, done: Done) -> dict:
        out = self.head("chat.completion")
        out["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                           "logprobs": None, "finish_reason": done.finish_reason}]
        out["usage"] = usage(done)
        out["timings"] = timings(done)
        return out


def usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def timings(done: Done) -> dict:
    """llama-server's `timings` extension: the prompt's and the answer's time (ms) and speed."""
    n = done.completion_tokens
    gen = done.generate_seconds
    return {"prompt_n": done.prompt_tokens - done.cached, "cache_n": done.cached,
            "prompt_ms": round(done.prompt_seconds * 1000, 3), "predicted_n": n,
            "predicted_ms": round(gen * 1000, 3),
            "predicted_per_second": round((n - 1) / gen, 3) if n > 1 and gen > 0 else None}


def sse(obj: dict | str) -> bytes:
    """One server-sent event (`data: ...` and a blank line)."""
    return b"data: " + (obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)).encode() + b"\n\n"


def failure(f: Failed) -> ApiError:
    """A request the scheduler could not serve, as the HTTP error a client gets."""
    if f.kind == "context_length_exceeded":
        return context_length_exceeded(f.prompt_tokens, f.n_ctx)
    if f.kind == "grammar":
        return ApiError(400, f.message, param="response_format", code="invalid_grammar")
    if f.kind == "bad_request":
        return ApiError(400, f.message, param="messages", code="invalid_value")
    if f.kind == "unavailable":
        return overloaded(1, f.message)
    return ApiError(500, f.message, code="internal_error")


def metrics_text(counters: Counters, snapshot: dict, *, images_encoded: int, decoded: int, copied: int,
                 reused: int, decode_calls: int, n_ctx: int) -> str:
    """Prometheus' text exposition format (version 0.0.4)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP llava_gguf_{name} {help_text}")
        lines.append(f"# TYPE llava_gguf_{name} {kind}")
        for labels, value in samples:
            lines.append(f"llava_gguf_{name}{labels} {value}")

    c = counters
    metric("requests_total", "counter", "Chat completion requests accepted, by outcome.",
           [('{outcome="accepted"}', c.requests), ('{outcome="failed"}', c.requests_failed),
            ('{outcome="cancelled"}', c.requests_cancelled), ('{outcome="rejected_queue_full"}', c.requests_rejected)])
    metric("prompt_tokens_total", "counter", "Prompt positions (text tokens and image rows).", [("", c.prompt_tokens)])
    metric("cached_tokens_total", "counter", "Prompt positions taken from the KV cache (own or another sequence's).",
           [("", c.cached_tokens)])
    metric("completion_tokens_total", "counter", "Tokens generated.", [("", c.completion_tokens)])
    metric("images_encoded_total", "counter", "Images run through the vision tower (the rest came from the "
           "embedding cache).", [("", images_encoded)])
    metric("decoded_positions_total", "counter", "Positions decoded by llama.cpp.", [("", decoded)])
    metric("copied_positions_total", "counter", "Positions copied between sequences (llama_memory_seq_cp).",
           [("", copied)])
    metric("reused_positions_total", "counter", "Positions a sequence kept from its own cache.", [("", reused)])
    metric("decode_calls_total", "counter", "llama_decode calls.", [("", decode_calls)])
    metric("queue_depth", "gauge", "Requests waiting for a sequence.", [("", snapshot["queue"])])
    metric("context_positions", "gauge", "Positions each sequence can hold.", [("", n_ctx)])
    states = ("idle", "prompt", "generating", "busy")
    metric("slot_state", "gauge", "Each sequence's state (1 for the current one).",
           [(f'{{slot="{seq}",state="{st}"}}', int(st == state)) for seq, state, _ in snapshot["slots"] for st in states])
    metric("slot_cached_positions", "gauge", "Positions each sequence's cache holds.",
           [(f'{{slot="{seq}"}}', held) for seq, _, held in snapshot["slots"]])
    return "\n".join(lines) + "\n"
