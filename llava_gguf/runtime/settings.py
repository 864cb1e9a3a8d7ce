"""Settings checked before any native work, in one place for the API and the CLI: sampling, text the
tokenizer gets, threads, and the memory a context needs."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from ..errors import InvalidSetting, LlavaGgufError, warn
from .gguf_info import GGUFInfo


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
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


def sampling_settings(*, max_tokens=256, temperature=0.2, top_p=0.95, top_k=40, repeat_penalty=1.1, stop=None,
                      seed=None, min_p: float = 0.05) -> Sampling:
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


def kv_cache_bytes(info: GGUFInfo, n_ctx: int) -> int | None:
    """The bytes llama.cpp's KV cache takes for `n_ctx` positions: K and V in F16 (its default types)
    for every layer, n_head_kv heads of key_length / value_length values each (n_embd / n_head when the
    GGUF gives no lengths). None when the GGUF lacks the numbers."""
    if not info.n_layer or not info.n_head or not info.n_head_kv or not info.n_embd:
        return None
    k = info.key_length or info.n_embd // info.n_head
    v = info.value_length or info.n_embd // info.n_head
    return n_ctx * sum(h * (k + v) for h in info.n_head_kv) * 2


def available_memory(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process can still allocate: MemAvailable, lowered by a cgroup (v2) memory limit."""
    avail = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        cg = cgroup
        limit = (cg / "memory.max").read_text().strip()
        if limit != "max":
            # memory.current counts the page cache too (a model just read sits there): what the kernel
            # reclaims first, inactive_file, is room as well (as docker stats and the kubelet count it)
            used = int((cg / "memory.current").read_text().strip())
            for line in (cg / "memory.stat").read_text().splitlines():
                if line.startswith("inactive_file "):
                    used -= int(line.split()[1])
            room = int(limit) - max(0, used)
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_memory(info: GGUFInfo, n_ctx: int, least: int = 0) -> None:
    """Refuse, with the numbers, a context whose KV cache and attention scores do not fit in the memory
    available now (llama.cpp would allocate and clear gigabytes of KV cache before failing)."""
    padded = -(-n_ctx // 256) * 256  # llama.cpp pads its context to 256 positions
    kv = kv_cache_bytes(info, padded)
    avail = available_memory()
    if kv is None or avail is None:
        return
    # without flash attention (llama.cpp's default on CPU) one batch's attention scores are materialised:
    # f32 per head, plus the mask, for every position of the context
    ubatch = min(512, padded)
    scores = padded * ubatch * (info.n_head * 4 + 4)
    if kv + scores > avail:
        k = info.key_length or info.n_embd // info.n_head
        # a suggestion only when it still holds `least` positions (an image and a question)
        fits = next((c for c in (2**p for p in range(30, 7, -1)) if least <= c < n_ctx and
                     2 * (kv_cache_bytes(info, c) + c * min(512, c) * (info.n_head * 4 + 4)) <= avail), None)
        raise InvalidSetting(
            f"a context of {n_ctx} tokens needs {_gib(kv + scores)} of memory ({_gib(kv)} of KV cache: "
            f"{info.n_layer} layers x {max(info.n_head_kv)} KV heads x {k} dims x K and V in F16, and "
            f"{_gib(scores)} of attention scores for a {ubatch}-token batch) but {_gib(avail)} is available",
            f"pass a smaller n_ctx (--ctx), e.g. {fits}" if fits else
            f"free some memory: a context that holds one image ({least} positions) does not fit either")


def thread_count(n_threads) -> int:
    """n_threads, or all usable CPUs; more threads than CPUs only make llama.cpp's threads wait for each
    other (10000 threads: 82 s for what 2 do in 3 s), so a larger number is capped, with a warning."""
    cpus = usable_cpus()
    if n_threads is None:
        return cpus
    if not is_int(n_threads) or n_threads < 1:
        raise InvalidSetting(f"n_threads (--threads) must be a positive integer, not {n_threads!r}")
    if n_threads > cpus:
        warn(f"{n_threads} threads capped at {cpus}, the number of CPUs this process can use", stacklevel=3)
        return cpus
    return int(n_threads)
