"""Why writing an output failed, said in one line: errno as the user can act on it (no space, a size
limit, a quota), the device's state when a native writer (llama.cpp's quantizer, llama-imatrix) lost
errno, and which process holds an output another run is writing (from /proc/locks)."""
from __future__ import annotations

import errno
import os
import resource
from pathlib import Path

from llava_gguf.errors import LlavaGgufError


def lock_holder(st: os.stat_result) -> str:
    """`pid N: its command line`, read from /proc/locks (Linux); a neutral phrase elsewhere."""
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "another process"
    for line in lines:
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK" or fields[5] != key:
            continue
        pid = fields[4]
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = ""
        return f"pid {pid}: {cmd[:120]}" if cmd else f"pid {pid}"
    return "another process"


def write_error(e: OSError, target: Path | None, written: Path | None = None) -> LlavaGgufError:
    """A failed write as one line naming the output (never the temporary's name). Some writers lose
    errno (numpy's tofile: "16384 requested and 32 written"): then `written`, the file being written,
    tells whether the device or a limit was the cause."""
    what = target if target is not None else "the output"
    if e.errno is None and written is not None:
        device = native_write_error(written, target if target is not None else written)
        if device is not None:
            return device
    if e.errno == errno.ENOSPC:
        return LlavaGgufError(f"no space left on device writing {what}", "free some space or choose another output")
    if e.errno == errno.EFBIG:
        return LlavaGgufError(f"file size limit reached writing {what}", "see `ulimit -f`")
    if e.errno == errno.EDQUOT:
        return LlavaGgufError(f"disk quota exceeded writing {what}")
    return LlavaGgufError(f"writing {what} failed: {e.strerror or e}")


def native_write_error(written: Path, target: Path) -> LlavaGgufError | None:
    """Why a native writer (llama.cpp's quantizer, llama-imatrix) that hides errno failed on `written`,
    when the cause is the device or a limit rather than the input: it reports only "iostream error"."""
    try:
        size = os.stat(written).st_size
        vfs = os.statvfs(written)
    except OSError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and size >= soft:
        return write_error(OSError(errno.EFBIG, os.strerror(errno.EFBIG)), target)
    free = (vfs.f_bfree if os.geteuid() == 0 else vfs.f_bavail) * vfs.f_frsize
    if free < 2**20:  # a write that failed on a device with less than a MiB left: it was full
        return write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), target)
    return None
