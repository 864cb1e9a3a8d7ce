"""llama.cpp's own converter, from the pinned llama-cpp-python sdist: the anchor tests and benchmarks
compare our files against (not shipped: only tests and bench/ use it)."""
from __future__ import annotations

import os
from pathlib import Path

from llava_gguf.errors import LlavaGgufError
from llava_gguf.settings import LLAMA_CPP_PYTHON_VERSION, cache_dir


def llama_cpp_sdist() -> Path:
    """The pinned llama-cpp-python sdist the native build used (fetched by bin/'s set-up or the build)."""
    path = Path(os.environ.get("LLAVA_GGUF_SDIST") or cache_dir() / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz")
    if not path.is_file():
        raise LlavaGgufError(f"the llama-cpp-python sdist is not at {path}",
                             "set LLAVA_GGUF_SDIST, or run ./bin/llava-gguf once to fetch it")
    return path


def llama_cpp_converter(dest: Path) -> Path:
    """llama.cpp's own convert_hf_to_gguf.py (with its conversion/ and gguf-py/), extracted from the
    same sdist our native part is built from: the anchor our LLM files are compared against."""
    import tarfile

    script = Path(dest) / "convert_hf_to_gguf.py"
    if not script.is_file():
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        with tarfile.open(llama_cpp_sdist()) as tar:
            members = [m for m in tar.getmembers() if m.name == prefix + "convert_hf_to_gguf.py"
                       or m.name.startswith((prefix + "conversion/", prefix + "gguf-py/"))]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(dest, members=members, filter="data")
    return script
