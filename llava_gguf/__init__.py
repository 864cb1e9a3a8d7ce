"""llava-gguf: LLaVA checkpoints from Hugging Face to GGUF, run faithfully on llama.cpp."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import InvalidSetting, LlavaGgufError, LlavaGgufWarning

__version__ = "0.1.0"
__all__ = ["LLaVA", "LlavaGgufError", "LlavaGgufWarning", "InvalidSetting", "convert_checkpoint", "__version__"]

if TYPE_CHECKING:
    from .convert import convert_checkpoint
    from .runtime.model import LLaVA


def __getattr__(name: str):
    # Lazy: importing the package must not load transformers, torch or the native libraries.
    if name == "LLaVA":
        from .runtime.model import LLaVA

        return LLaVA
    if name == "convert_checkpoint":
        from .convert import convert_checkpoint

        return convert_checkpoint
    raise AttributeError(name)
