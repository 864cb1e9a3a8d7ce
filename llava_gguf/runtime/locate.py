"""Finding the model pair in a directory that `convert` (or `quantize`) wrote."""
from __future__ import annotations

from pathlib import Path

from ..errors import LlavaGgufError

_FLOAT_TYPES = ("F32", "F16", "BF16")


def _arch(path: Path) -> str:
    from .model import read_gguf_info

    try:
        return read_gguf_info(path, "file").arch
    except LlavaGgufError:
        return "?"


def locate_pair(path: Path | str, llm: Path | str | None = None, mmproj: Path | str | None = None) -> tuple[Path, Path]:
    """(LLM, mmproj) for a directory, or for an LLM file plus an explicit mmproj."""
    path = Path(path)
    if path.is_file():
        if mmproj is None:
            return locate_pair(path.parent, llm=path)
        return path, Path(mmproj)
    if not path.is_dir():
        raise LlavaGgufError(f"{path} does not exist", "give the directory that `llava-gguf convert` wrote")
    archs = {p: _arch(p) for p in sorted(path.glob("*.gguf")) if p.is_file()}  # each file parsed once
    mmprojs = [Path(mmproj)] if mmproj else [p for p, a in archs.items() if a == "clip"]
    llms = [Path(llm)] if llm else [p for p, a in archs.items() if p not in mmprojs and a not in ("clip", "?")]
    if not llms:
        raise LlavaGgufError(f"no language-model .gguf in {path}", "run `llava-gguf convert` first")
    if not mmprojs:
        raise LlavaGgufError(f"no mmproj .gguf in {path}", "run `llava-gguf convert` first")
    if len(llms) > 1:
        quantized = [p for p in llms if not p.stem.upper().endswith(_FLOAT_TYPES)]
        if len(quantized) == 1:
            llms = quantized
        else:
            raise LlavaGgufError(f"several language models in {path}: {', '.join(p.name for p in llms)}",
                                 "choose one with --model")
    if len(mmprojs) > 1:
        stem = llms[0].stem.rsplit("-", 1)[0]
        same = [p for p in mmprojs if p.stem.startswith(f"mmproj-{stem}-")]
        if len(same) >= 1:
            same.sort(key=lambda p: (not p.stem.upper().endswith("F16"), p.name))
            mmprojs = same[:1]
        else:
            raise LlavaGgufError(f"several mmproj files in {path}: {', '.join(p.name for p in mmprojs)}",
                                 "choose one with --mmproj")
    return llms[0], mmprojs[0]
