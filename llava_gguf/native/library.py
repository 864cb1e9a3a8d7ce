"""The native boundary: which libllama/ggml/libmtmd this process uses, set before `llama_cpp` is
first imported. Nothing else in the package touches library paths or these environment variables.

Our build (top-level CMakeLists.txt, installed into `llava_gguf/lib`) carries the CLS-order fix for
libmtmd's llava graph (upstream llama.cpp #25814); `lib/stock` holds the same libmtmd without it, for
tests and comparisons only. llama-cpp-python reads LLAMA_CPP_LIB_PATH (libllama + ggml) and
MTMD_CPP_LIB (libmtmd) when `llama_cpp` / `llama_cpp.mtmd_cpp` are imported; both point into one
build, so exactly one ggml is loaded."""
from __future__ import annotations

import atexit
import ctypes
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from llava_gguf.errors import LlavaGgufError

ENV_LIB_DIR = "LLAVA_GGUF_LIB_DIR"  # override: a directory holding libllama, ggml and libmtmd
ENV_MTMD_VARIANT = "LLAVA_GGUF_MTMD"  # "fixed" (default) or "stock"
_SUFFIX = ".dll" if sys.platform == "win32" else ".dylib" if sys.platform == "darwin" else ".so"


def _lib(name: str) -> str:
    return f"{name}{_SUFFIX}" if sys.platform == "win32" else f"lib{name}{_SUFFIX}"


@dataclass(frozen=True)
class NativeLibs:
    lib_dir: Path  # LLAMA_CPP_LIB_PATH
    mtmd_dir: Path  # MTMD_CPP_LIB
    variant: str  # "fixed" | "stock" | "external"
    tools_dir: Path | None


def _candidate_dirs() -> list[Path]:
    dirs = [Path(__file__).resolve().parent.parent / "lib"]  # the llava_gguf package's own lib/
    # editable installs keep built files in site-packages while the package path points at the source
    for key in ("platlib", "purelib"):
        dirs.append(Path(sysconfig.get_paths()[key]) / "llava_gguf" / "lib")
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def find_libraries() -> NativeLibs:
    variant = os.environ.get(ENV_MTMD_VARIANT, "fixed")
    if variant not in ("fixed", "stock"):
        raise LlavaGgufError(f"{ENV_MTMD_VARIANT}={variant!r} is not 'fixed' or 'stock'")
    override = os.environ.get(ENV_LIB_DIR)
    if override:
        d = Path(override)
        if not (d / _lib("llama")).is_file() or not (d / _lib("mtmd")).is_file():
            raise LlavaGgufError(f"{ENV_LIB_DIR}={override} holds no {_lib('llama')} and {_lib('mtmd')}")
        return NativeLibs(d, d, "external", None)
    for d in _candidate_dirs():
        if (d / _lib("llama")).is_file() and (d / _lib("mtmd")).is_file():
            mtmd = d / "stock" if variant == "stock" else d
            if not (mtmd / _lib("mtmd")).is_file():
                raise LlavaGgufError(f"no stock libmtmd in {mtmd}", "rebuild the native part")
            tools = d.parent / "bin"
            return NativeLibs(d, mtmd, variant, tools if tools.is_dir() else None)
    raise LlavaGgufError("llava-gguf's native libraries are not built",
                         "install the package with pip (it builds them), or run ./bin/llava-gguf once")


_configured: NativeLibs | None = None


def configure() -> NativeLibs:
    """Point llama-cpp-python at our libraries; must run before `llama_cpp` is imported."""
    global _configured
    if _configured is not None:
        return _configured
    libs = find_libraries()
    if "llama_cpp" in sys.modules:
        loaded = os.environ.get("LLAMA_CPP_LIB_PATH")
        if loaded is None or Path(loaded) != libs.lib_dir:
            raise LlavaGgufError("llama_cpp was imported before llava_gguf configured its native libraries",
                                 "import llava_gguf (or call llava_gguf.native.library.configure()) first")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(libs.lib_dir)
    os.environ["MTMD_CPP_LIB"] = str(libs.mtmd_dir)
    _configured = libs
    return libs


def llama_cpp():
    """The configured `llama_cpp` module."""
    configure()
    import llama_cpp as module  # heavy, and must load after configure() has set the library paths

    _close_devnull_at_exit()
    return module


_devnull_registered = False


def _close_devnull_at_exit() -> None:
    """llama-cpp-python opens two /dev/null files at import (llama_cpp._utils) and never closes them;
    depending on the order of interpreter teardown Python then prints "ResourceWarning: unclosed file"
    on stderr after our own output. Close them at exit, before the teardown."""
    global _devnull_registered
    if _devnull_registered:
        return
    _devnull_registered = True
    def close() -> None:
        utils = sys.modules.get("llama_cpp._utils")
        for name in ("outnull_file", "errnull_file"):
            f = getattr(utils, name, None)
            if f is not None and not f.closed:
                try:
                    f.close()
                except OSError:
                    pass

    atexit.register(close)


def mtmd_cpp():
    configure()
    import llama_cpp.mtmd_cpp as module  # heavy, and must load after configure() has set the library paths

    return module


def quiet_logs(verbose: bool) -> None:
    """llama.cpp and libmtmd log to stderr unless given a callback; keep them quiet unless verbose."""
    lc = llama_cpp()
    if verbose:
        return
    global _log_cb
    if _log_cb is None:
        @lc.llama_log_callback
        def _silent(level, text, user_data):  # noqa: ANN001
            return None

        _log_cb = _silent
    lc.llama_log_set(_log_cb, None)
    mt = mtmd_cpp()
    mt.mtmd_log_set(_log_cb, None)
    mt.mtmd_helper_log_set(_log_cb, None)


_log_cb = None


def backend_devices() -> list[dict[str, str]]:
    """ggml's backend devices in the loaded build (name, description, type), read from libggml."""
    configure()
    llama_cpp()  # loads libggml through libllama
    lib = ctypes.CDLL(str(_configured.lib_dir / _lib("ggml")))  # type: ignore[union-attr]
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_name.restype = ctypes.c_char_p
    lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_description.restype = ctypes.c_char_p
    lib.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    kinds = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        out.append({"name": lib.ggml_backend_dev_name(dev).decode(errors="replace"),
                    "description": lib.ggml_backend_dev_description(dev).decode(errors="replace"),
                    "type": kinds.get(lib.ggml_backend_dev_type(dev), "other")})
    return out
