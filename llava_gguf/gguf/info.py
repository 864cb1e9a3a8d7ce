"""What the runtime needs to know of a GGUF file before handing it to llama.cpp: its role, widths,
template, context, the mmproj's geometry, and the numbers the KV cache's size follows from."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.header import GGUFHeader, check_loadable
from llava_gguf.gguf.llm_defects import LLAMA_MAX_LAYERS


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    arch: str
    n_embd: int
    chat_template: str | None
    context_length: int | None
    image_tokens: int | None  # mmproj only
    image_size: int | None = None  # mmproj only: the vision tower's input resolution
    pinpoints: tuple[int, ...] | None = None  # mmproj only: LLaVA-1.6's image_grid_pinpoints (flat h, w pairs)
    # LLM only: what the KV cache's size follows from, and Mistral's attention window (see _context_size)
    n_layer: int | None = None
    n_head: int | None = None
    n_head_kv: tuple[int, ...] | None = None  # per layer (GGUF allows one value or one per layer)
    key_length: int | None = None
    value_length: int | None = None
    sliding_window: int | None = None


def open_header(path: Path, what: str) -> GGUFHeader:
    """The header of a GGUF file whose structure llama.cpp would accept, or a one-line error naming `what`
    is missing or unreadable."""
    if not path.exists():
        raise LlavaGgufError(f"{what} {path} does not exist")
    return check_loadable(path)


def open_gguf(path: Path, what: str) -> gguf.GGUFReader:
    """A gguf-py reader of the whole file, for tensor data (LLaVA-1.6's image_newline, repair), or a
    one-line error naming `what` is missing or unreadable. Headers are read with `open_header`."""
    # gguf-py trusts the counts it reads (a hostile array length loops for minutes, a cut file reads past
    # its end) and raises any exception type: the file's structure is walked and checked first
    open_header(path, what)
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf-py on a file the walk accepted: still one line, never a traceback
        raise LlavaGgufError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:200]})",
                             "convert the model again") from None


def read_gguf_info(path: Path, what: str, reader: GGUFHeader | None = None) -> GGUFInfo:
    """What the runtime needs of a GGUF; `reader`: the file's header when the caller has read it."""
    field = (reader if reader is not None else open_header(path, what)).value

    arch = field("general.architecture") or "?"
    if arch == "clip":
        n_embd = field("clip.vision.projection_dim")
        size, patch = field("clip.vision.image_size"), field("clip.vision.patch_size")
        tokens = (size // patch) ** 2 if size and patch else None
        pins = field("clip.vision.image_grid_pinpoints")
        return GGUFInfo(path, arch, int(n_embd or 0), None, None, tokens, int(size) if size else None,
                        tuple(int(v) for v in pins) if pins else None)
    n_layer = _positive(field(f"{arch}.block_count"))
    n_head = _positive(field(f"{arch}.attention.head_count"))
    kv = field(f"{arch}.attention.head_count_kv")
    kv = kv if kv is not None else n_head
    n_head_kv = None  # a value that makes no sense (a damaged file) leaves the memory check out
    if isinstance(kv, list) and kv and all(_positive(v) or v == 0 for v in kv):
        n_head_kv = tuple(int(v) for v in kv)
    elif _positive(kv) and n_layer and n_layer <= LLAMA_MAX_LAYERS:  # a hostile count must not size a tuple
        n_head_kv = (int(kv),) * n_layer
    return GGUFInfo(path, arch, int(field(f"{arch}.embedding_length") or 0), field("tokenizer.chat_template"),
                    field(f"{arch}.context_length"), None, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
                    key_length=_positive(field(f"{arch}.attention.key_length")),
                    value_length=_positive(field(f"{arch}.attention.value_length")),
                    sliding_window=_positive(field(f"{arch}.attention.sliding_window")))


def _positive(value) -> int | None:
    """A GGUF integer that must be positive to mean anything (0 or absent: not given)."""
    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0 else None
