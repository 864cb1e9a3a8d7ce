"""What a context costs and what this process may use: the KV cache's bytes against the memory available
(cgroup limits included), and threads against the CPUs this process may run on. Checked before anything
native is allocated."""
from __future__ import annotations

import os
from pathlib import Path

from llava_gguf.errors import InvalidSetting, warn
from llava_gguf.gguf.info import GGUFInfo
from llava_gguf.runtime.sampling import is_int


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
