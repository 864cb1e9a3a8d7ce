"""llava-gguf: LLaVA checkpoints from Hugging Face to GGUF, run faithfully on llama.cpp."""
from __future__ import annotations

from typing import TYPE_CHECKING

from llava_gguf.errors import InvalidSetting, LlavaGgufError, LlavaGgufWarning
from llava_gguf.settings import VERSION as __version__

__all__ = ["LLaVA", "LlavaGgufError", "LlavaGgufWarning", "InvalidSetting", "convert_checkpoint", "__version__"]

if TYPE_CHECKING:
    from llava_gguf.convert import convert_checkpoint
    from llava_gguf.runtime.model import LLaVA


def __getattr__(name: str):
    # Lazy, so that `import llava_gguf` (and every `from llava_gguf.x import ...`, which runs this file first)
    # stays light: each name's module is imported on first use only. No module of the package imports
    # the root package itself, so these imports close no cycle.
    if name == "LLaVA":
        from llava_gguf.runtime.model import LLaVA  # lazy: the runtime (numpy, PIL, jinja2) on first use

        return LLaVA
    if name == "convert_checkpoint":
        from llava_gguf.convert import convert_checkpoint  # lazy: the converter on first use

        return convert_checkpoint
    raise AttributeError(name)
