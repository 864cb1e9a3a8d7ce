"""One quantization, planned then run: `QuantizeJob.plan` makes every check that can fail before any output
exists (the source's kind, its load defects, the type, the importance matrix), and `run` calls llama.cpp's
quantizer in process (llama-cpp-python's `llama_model_quantize` binding on our own libraries: the same code
`llama-quantize` runs, so the output is the same bytes) in a worker thread that feeds the progress bar
from llama.cpp's log and survives Ctrl-C cleanly. `convert --outtype Q4_K_M` runs one too."""
from __future__ import annotations

import ctypes
import os
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llava_gguf.errors import LlavaGgufError, warn
from llava_gguf.gguf.classify import GGUFKind, classify
from llava_gguf.gguf.defects import chat_template_defects, require_loadable
from llava_gguf.gguf.output_errors import native_write_error
from llava_gguf.native import library as native
from llava_gguf.quantize.imatrix import Imatrix, NativeImatrix, load_imatrix
from llava_gguf.quantize.types import MMPROJ_QUANT_TYPES, QuantType

Progress = Callable[[int, int, str], None]  # (tensors done, tensors in all, current tensor name)
# Rows of one tensor held in memory at once. llama-quantize's default (8 GiB) converts a whole token_embd
# to f32 (525 MB at 7B); slabs of 256 MiB give the same bytes with less memory.
MAX_BUF_SIZE = 256 * 2**20


@dataclass
class QuantizeJob:
    src: GGUFKind
    qtype: QuantType
    allow_requantize: bool
    imatrix: Imatrix | None

    @classmethod
    def plan(cls, src: Path, qtype: QuantType, *, allow_requantize: bool, imatrix: str | Path | None) -> QuantizeJob:
        """Every check that can fail, before any output exists."""
        kind = classify(src)
        # llama.cpp's quantizer loads the source as the runtime does (an invalid hparam aborts the process,
        # a bad vocabulary would be copied on): what would stop llama.cpp is refused here, with one line
        header = require_loadable(src, "source", header=kind.header)
        if kind.kind == "llm":  # llama.cpp does not read the template; our chat refuses it: say so now
            for d in chat_template_defects(header):
                warn(f"{src}: {d.message}", "the quantized model keeps it; convert the checkpoint again")
        if kind.kind == "mmproj":
            if qtype.name not in MMPROJ_QUANT_TYPES:
                raise LlavaGgufError(f"{src} is an mmproj file, which is quantized to {', '.join(MMPROJ_QUANT_TYPES)} only",
                                     "libmtmd is not shown to load and run it in other types")
            if imatrix is not None:
                raise LlavaGgufError("an importance matrix applies to the language model, not to an mmproj file")
        if qtype.needs_imatrix and imatrix is None:
            raise LlavaGgufError(f"{qtype.name} needs an importance matrix",
                                 f"compute one with `llava-gguf imatrix {src.name} -o imatrix.gguf`, then pass --imatrix imatrix.gguf")
        if kind.quantized and not allow_requantize:
            raise LlavaGgufError(f"{src} is already quantized ({kind.type})",
                                 "quantize the F16/F32 file instead, or pass --allow-requantize (it costs quality)")
        loaded = None
        if imatrix is not None:
            loaded = load_imatrix(imatrix)
        return cls(kind, qtype, allow_requantize, loaded)

    def run(self, dest: Path, *, threads: int | None, leave_output_tensor: bool, verbose: bool,
            progress: Progress | None, target: Path, on_abandon: Callable[[], None] | None = None) -> None:
        """Quantize into `dest` (the OutputSet's path for a temporary); `target` is the final name,
        which messages name."""
        native.configure()
        lc = native.llama_cpp()
        params = lc.llama_model_quantize_default_params()
        params.nthread = threads or 0
        params.ftype = self.qtype.ftype
        params.allow_requantize = self.allow_requantize
        params.quantize_output_tensor = not leave_output_tensor
        params.max_buf_size = MAX_BUF_SIZE
        keep_alive = None
        if self.imatrix is not None:
            keep_alive = NativeImatrix(lc, self.imatrix)
            params.imatrix = ctypes.cast(keep_alive.data, type(params.imatrix))
            params.kv_overrides = ctypes.cast(keep_alive.kv, type(params.kv_overrides))
        src_b, dest_b = os.fsencode(self.src.path), os.fsencode(dest)
        rc, last_error = _call_native(lambda: lc.llama_model_quantize(src_b, dest_b, ctypes.byref(params)),
                                      dest, verbose=verbose, progress=progress, on_abandon=on_abandon)
        del keep_alive
        if rc != 0:
            # llama.cpp's ofstream turns ENOSPC into "basic_ios::clear: iostream error": ask the device
            device = native_write_error(dest, target)
            if device is not None:
                raise device
            last_error = last_error.replace(os.fsdecode(dest_b), str(target))
            why = f": {last_error}" if last_error else ""
            raise LlavaGgufError(f"llama.cpp could not quantize {self.src.path.name} to {self.qtype.name}{why}"[:400],
                                 "--verbose shows llama.cpp's log")


_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
# ctypes callbacks handed to llama.cpp stay alive for the life of the process: a worker abandoned on
# Ctrl-C may still log through its callback after we return.
_log_callbacks: list = []
_GGML_LOG_LEVEL_ERROR = 4  # ggml.h: enum ggml_log_level
_abandoned: list[threading.Thread] = []


def _call_native(fn: Callable[[], int], dest: Path, *, verbose: bool, progress: Progress | None,
                 on_abandon: Callable[[], None] | None = None) -> tuple[int, str]:
    """Run llama_model_quantize in a worker thread, feeding `progress` from llama.cpp's per-tensor log
    lines; returns (return code, last error line llama.cpp logged).

    llama.cpp cannot be stopped half-way, so on Ctrl-C (or SIGTERM) this waits until the output file is
    open (the first tensor line: a fraction of a second), then lets the caller remove it at once; the
    worker's writes go to the unlinked file, and if it ever finishes it removes the file it wrote (only
    that one). The CLI exits right after, which ends the worker too."""
    if any(t.is_alive() for t in _abandoned):
        raise LlavaGgufError("a quantization interrupted earlier is still finishing in the background",
                             "wait for it, or start a new process")
    lc = native.llama_cpp()
    opened = threading.Event()
    done = threading.Event()
    cancelled = threading.Event()
    state: dict = {"rc": 1, "total": 0, "error": "", "ino": None}

    @lc.llama_log_callback
    def on_log(level, text, user_data):  # noqa: ANN001
        s = text.decode(errors="replace") if text else ""
        m = _TENSOR_LINE.match(s)
        if m:
            if not opened.is_set():
                try:
                    state["ino"] = dest.stat().st_ino
                except OSError:
                    pass
                opened.set()
            state["total"] = int(m.group(2))
            if progress is not None and not cancelled.is_set():
                progress(int(m.group(1)) - 1, state["total"], m.group(3))
        elif level == _GGML_LOG_LEVEL_ERROR and s.strip():
            state["error"] = " ".join(s.split())
        if verbose:
            sys.stderr.write(s)
            sys.stderr.flush()

    _log_callbacks.append(on_log)
    lc.llama_log_set(on_log, None)

    def work() -> None:
        try:
            state["rc"] = fn()
        finally:
            done.set()
            if cancelled.is_set():
                try:
                    if state["ino"] is None or dest.stat().st_ino == state["ino"]:
                        dest.unlink()
                except OSError:
                    pass

    worker = threading.Thread(target=work, name="llama_model_quantize", daemon=True)
    worker.start()
    try:
        while not done.wait(0.1):
            pass
    except BaseException:
        cancelled.set()
        _abandoned.append(worker)
        if on_abandon is not None:
            on_abandon()  # the worker may still open `dest` (/proc/self/fd/N): keep N from being reused
        deadline = 30.0
        while deadline > 0 and not (opened.is_set() or done.is_set()):
            try:
                opened.wait(0.1)
            except KeyboardInterrupt:
                pass  # a second Ctrl-C: still wait (briefly) until removing the partial is final
            deadline -= 0.1
        raise
    finally:
        if done.is_set():
            if verbose:
                lc.llama_log_set(None, None)  # llama.cpp's own stderr logging again
            else:
                native.quiet_logs(verbose)
    if state["rc"] == 0 and progress is not None and state["total"]:
        progress(state["total"], state["total"], "")
    return state["rc"], state["error"]
