"""One source for the defaults and pins every layer shares: the package version, the llama-cpp-python
release whose llama.cpp we build (CMakeLists.txt and bin/lib/bootstrap.sh read the line below; a test
checks pyproject.toml's pin against it), where caches live, and the sampling defaults."""
from __future__ import annotations

import os
from pathlib import Path

VERSION = "0.1.0"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

# The runtime's sampling defaults (LLaVA.generate_from_image, chat, the server): llama.cpp's usual ones,
# with a low temperature because answers about an image should stay on the image.
SAMPLING_DEFAULTS = {"max_tokens": 256, "temperature": 0.2, "top_p": 0.95, "top_k": 40, "repeat_penalty": 1.1,
                     "min_p": 0.05}


def cache_dir() -> Path:
    """$LLAVA_GGUF_CACHE, or llava-gguf under $XDG_CACHE_HOME (~/.cache)."""
    base = os.environ.get("LLAVA_GGUF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llava-gguf")
    return Path(base)

# Questions about an image that `quality` measures answers along and `imatrix --images` calibrates with.
IMAGE_PROMPTS = (
    "Describe this image in one sentence.",
    "What colours stand out in this picture?",
    "How many shapes can you see, and where are they?",
    "Is there anything unusual in this image?",
)
