"""Sampling settings and the text the tokenizer gets, checked before any native work, in one place for the
API, the CLI and the server. The defaults are llava_gguf.settings.SAMPLING_DEFAULTS."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llava_gguf.errors import InvalidSetting, LlavaGgufError
from llava_gguf.settings import SAMPLING_DEFAULTS

MIN_P = SAMPLING_DEFAULTS["min_p"]  # llama-cpp-python's Llama.generate default; no option sets it


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = SAMPLING_DEFAULTS["max_tokens"]
    temperature: float = SAMPLING_DEFAULTS["temperature"]
    top_p: float = SAMPLING_DEFAULTS["top_p"]
    top_k: int = SAMPLING_DEFAULTS["top_k"]
    min_p: float = MIN_P
    repeat_penalty: float = SAMPLING_DEFAULTS["repeat_penalty"]
    stop: tuple[str, ...] = ()
    seed: int | None = None


_SEED_MAX = 2**32 - 1  # llama.cpp's seeds are uint32; 0xFFFFFFFF (LLAMA_DEFAULT_SEED) means random


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def check_seed(seed) -> int | None:
    """None, -1 or 0xFFFFFFFF (llama.cpp's LLAMA_DEFAULT_SEED): random; or a seed llama.cpp takes (uint32)."""
    if seed is None:
        return None
    if not is_int(seed) or not -1 <= seed <= _SEED_MAX:
        raise InvalidSetting(f"seed (--seed) must be an integer from 0 to {_SEED_MAX - 1}, or -1 for a random "
                             f"one, not {seed!r}")
    return None if seed in (-1, _SEED_MAX) else int(seed)


def sampling_settings(*, max_tokens=Sampling.max_tokens, temperature=Sampling.temperature, top_p=Sampling.top_p,
                      top_k=Sampling.top_k, repeat_penalty=Sampling.repeat_penalty, stop=None, seed=None,
                      min_p: float = MIN_P) -> Sampling:
    """The sampling settings, checked: the one validation the API and the CLI share (each message names
    the keyword and the CLI option)."""
    def bad(what: str, value) -> InvalidSetting:
        return InvalidSetting(f"{what}, not {value!r}")

    if not is_int(max_tokens) or max_tokens < 1:
        raise bad("max_tokens (--max-tokens) must be an integer of at least 1", max_tokens)
    if not is_number(temperature) or temperature < 0:
        raise bad("temperature (--temp) must be a number of at least 0 (0: greedy)", temperature)
    if not is_number(top_p) or not 0 <= top_p <= 1:
        raise bad("top_p (--top-p) must be a number from 0 to 1 (0: only the most likely token)", top_p)
    if not is_number(min_p) or not 0 <= min_p <= 1:
        raise bad("min_p must be a number from 0 to 1", min_p)
    if not is_int(top_k) or top_k < 0:
        raise bad("top_k (--top-k) must be an integer of at least 0 (0: all tokens)", top_k)
    if not is_number(repeat_penalty) or repeat_penalty <= 0:
        raise bad("repeat_penalty (--repeat-penalty) must be a number greater than 0 (1: none)", repeat_penalty)
    stops = (stop,) if isinstance(stop, str) else _as_tuple(stop) if stop is not None else ()
    if stops is None or isinstance(stop, (bytes, bytearray)) or not all(isinstance(st, str) for st in stops):
        raise bad("stop must be a string or a list of strings", stop)
    if any(not st for st in stops):
        raise InvalidSetting("stop strings must not be empty (an empty one would end every answer at once)")
    for st in stops:
        check_text(st, "a stop string")
    return Sampling(int(max_tokens), float(temperature), float(top_p), int(top_k), float(min_p),
                    float(repeat_penalty), stops, check_seed(seed))


def _as_tuple(x) -> tuple | None:
    """Any iterable of stop strings (a list, tuple, generator: consumed once, here), or None."""
    try:
        return tuple(x)
    except TypeError:
        return None


def check_text(text: str, what: str) -> None:
    """Text the tokenizer gets must be encodable as UTF-8: a lone surrogate (half of a UTF-16 pair, or a
    byte that was not UTF-8 in a command-line argument or terminal line, which Python keeps as
    U+DC80..U+DCFF) is refused here, naming where it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = ord(text[e.start])
        what_it_is = (f"the byte 0x{ch - 0xDC00:02X}, which is not UTF-8" if 0xDC80 <= ch <= 0xDCFF
                      else f"a lone surrogate U+{ch:04X}")
        raise LlavaGgufError(f"{what} is not valid text: character {e.start + 1} is {what_it_is}",
                             "give the text in UTF-8") from None
    except AttributeError:
        raise LlavaGgufError(f"{what} must be a string, not a {type(text).__name__}") from None


