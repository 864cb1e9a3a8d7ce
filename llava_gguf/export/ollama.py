"""`export ollama`: a Modelfile that makes a converted pair an Ollama model with vision.

Two `FROM` lines, the LLM first: Ollama's create classifies each file and keeps the CLIP one as the model's
projector (`ADAPTER` would load the mmproj as a LoRA: ollama #15346, #9780). A relative `FROM` is resolved
against the Modelfile's directory (parser.go `expandPath`, given `filepath.Dir` of `-f`), so files in or under
that directory are written relative (the directory can move as a whole) and others absolute. A `FROM` that
names no existing file is taken by Ollama as a model to pull, so the files are checked to exist here.
The TEMPLATE renders what our runtime renders (export/chat_formats.py); `num_ctx` holds the largest image
and a conversation, and is never below Ollama's own default (4096): the parameter may only add room."""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from llava_gguf.errors import LlavaGgufError
from llava_gguf.export.chat_formats import ChatFormat
from llava_gguf.export.source import ExportSource, load_source, slug
from llava_gguf.gguf.outputs import atomic_outputs

MODELFILE = "Modelfile"
CONVERSATION_ROOM = 1024  # context positions for the text around the image
MIN_CTX = 4096  # Ollama's default context (docs/faq.md); a LLaVA-1.5 chat with two images needs more than 2048
# Ollama's model names: [host/][namespace/]model[:tag]
_OLLAMA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}(/[A-Za-z0-9][A-Za-z0-9._-]{0,79}){0,2}"
                          r"(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?")


@dataclass(frozen=True)
class OllamaExport:
    modelfile: Path
    name: str
    command: str  # the `ollama create` line to run
    chat_format: str
    num_ctx: int
    llm: Path
    mmproj: Path


def context_for(source: ExportSource) -> int:
    """The next power of two that holds the largest image and CONVERSATION_ROOM (at least MIN_CTX), within
    the model's training context and Mistral's sliding window (llama.cpp's llama graph has none)."""
    need = source.image_tokens + CONVERSATION_ROOM
    n_ctx = max(MIN_CTX, 1 << (need - 1).bit_length())
    info = source.files.llm_info
    limits = [int(v) for v in (info.context_length, info.sliding_window) if v]
    return min([n_ctx, *limits])


def default_name(source: ExportSource) -> str:
    """The model's name, lowercased, tagged with the file's type (`llava-1.5-7b-hf:q4_k_m`): the F16 and the
    Q4_K_M of one model are two Ollama models, as in Ollama's library."""
    base = slug(source.name, lower=True) or "llava"
    tag = source.file_type.lower()
    return f"{base}:{tag}" if re.fullmatch(r"[a-z0-9_][a-z0-9._-]*", tag) else base


def check_name(name: str) -> str:
    if not _OLLAMA_NAME.fullmatch(name):
        raise LlavaGgufError(f"{name!r} is not a valid Ollama model name",
                             "letters, digits, '.', '_' and '-', as in llava-7b or me/llava:q4")
    return name


def from_path(path: Path, modelfile_dir: Path) -> str:
    """`path` as a FROM argument: relative to the Modelfile's directory when inside it, else absolute."""
    path, base = Path(os.path.abspath(path)), Path(os.path.abspath(modelfile_dir))
    text = f"./{path.relative_to(base).as_posix()}" if path.is_relative_to(base) else str(path)
    # the Modelfile parser drops unprintable characters, ends a value at a line break and unquotes one
    # that starts with a quote: such a path cannot be said in a Modelfile
    if not text.isprintable() or text.startswith('"') or text != text.strip():
        raise LlavaGgufError(f"the path {str(path)!r} cannot be written in a Modelfile",
                             "rename the file or its directory")
    return text


def modelfile_text(source: ExportSource, fmt: ChatFormat, modelfile_dir: Path, name: str, num_ctx: int) -> str:
    template = fmt.go_template  # never holds three double quotes, which the Modelfile cannot escape (tested)
    lines = [
        f"# Written by llava-gguf export ollama. Chat format: {fmt.name}. Create the model with:",
        f"#   ollama create {name} -f {MODELFILE}",
        f"FROM {from_path(source.llm, modelfile_dir)}",
        f"FROM {from_path(source.mmproj, modelfile_dir)}",
        f'TEMPLATE """{template}"""',
        *(f'PARAMETER stop "{s}"' for s in fmt.stops),
        f"PARAMETER num_ctx {num_ctx}",
    ]
    return "\n".join(lines) + "\n"


def export_ollama(path: Path, out_dir: Path | None = None, *, name: str | None = None, model: Path | None = None,
                  mmproj: Path | None = None, force: bool = False) -> OllamaExport:
    """Write `out_dir/Modelfile` (out_dir: the pair's directory) for the pair in `path`; never replaces a
    Modelfile without `force`."""
    source = load_source(Path(path), model, mmproj)
    name = check_name(name) if name is not None else default_name(source)
    out_dir = Path(out_dir) if out_dir is not None else source.llm.parent
    fmt, num_ctx = source.chat_format(), context_for(source)
    text = modelfile_text(source, fmt, out_dir, name, num_ctx)
    with atomic_outputs(out_dir, [MODELFILE], force=force) as out, out.open_write(0) as f:
        f.write(text.encode("utf-8"))
    modelfile = out_dir / MODELFILE
    return OllamaExport(modelfile, name, f"ollama create {shlex.quote(name)} -f {shlex.quote(str(modelfile))}",
                        fmt.name, num_ctx, source.llm, source.mmproj)
