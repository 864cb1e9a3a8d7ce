"""The load gate: every defect of a GGUF (its structure, gguf/layout.py; its role's keys and tensors,
gguf/llm_defects.py and gguf/mmproj_defects.py; its vocabulary and template, gguf/vocab_defects.py), and
`require_loadable`, which the runtime (before llama.cpp and libmtmd see the files), `quantize` (before
llama.cpp's quantizer reads its source) and `imatrix` run: a file with any defect that stops a loader is
refused with one line naming it. `inspect` reports them all (gguf/inspect.py). See
shared/llava-upstream-defects.md."""
from __future__ import annotations

from pathlib import Path

from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.header import GGUFHeader, read_header
from llava_gguf.gguf.layout import Defect, layout_defects
from llava_gguf.gguf.llm_defects import LLAMA_MAX_LAYERS, llm_defects
from llava_gguf.gguf.mmproj_defects import FEATURE_LAYER_KEY, mmproj_defects
from llava_gguf.gguf.vocab_defects import chat_template_defects, vocab_defects

# FEATURE_LAYER_KEY, LLAMA_MAX_LAYERS and chat_template_defects are read from here by checks/, cli/,
# families/ and the runtime: the gate's names, whichever module holds the rule.
__all__ = ["FEATURE_LAYER_KEY", "LLAMA_MAX_LAYERS", "LOADS_ANYWAY", "chat_template_defects", "gguf_defects",
           "require_loadable"]

# Defects of files that llama.cpp and libmtmd load and run: `inspect` reports them and `repair` fixes them,
# but the runtime and quantize go on (a legacy mmproj without its feature layer runs, one layer short).
LOADS_ANYWAY = frozenset({"feature-layer-missing", "feature-layer-unset", "post-layernorm"})


def gguf_defects(header: GGUFHeader, meta: dict | None = None) -> list[Defect]:
    """Every defect of a GGUF (its structure, then its role's keys and tensors) but its chat template's,
    as `inspect` lists them; `meta`: the header's metadata() when the caller has it."""
    meta = header.metadata() if meta is None else meta
    layout = header.layout
    defects = layout_defects(layout)
    names = [t.name for t in layout.tensors]
    arch = meta.get("general.architecture")
    if arch == "clip":
        return defects + mmproj_defects(layout, meta, names)
    arch = arch if isinstance(arch, str) else "?"
    return defects + llm_defects(layout, meta, arch) + vocab_defects(header)


def require_loadable(path: Path | str, what: str, header: GGUFHeader | None = None) -> GGUFHeader:
    """The header of a GGUF file llama.cpp or libmtmd can load, or a one-line error naming the first defect
    that makes it refuse or abort: run before a file is handed to llama.cpp (the runtime's lc.Llama and
    mtmd_init_from_file, quantize's llama_model_quantize). `header`: the file's, when the caller has read
    it already."""
    path = Path(path)
    if header is None and not path.exists():
        raise LlavaGgufError(f"{what} {path} does not exist")
    header = header if header is not None else read_header(path)
    fatal = [d for d in gguf_defects(header) if d.code not in LOADS_ANYWAY]
    if fatal:
        more = f" (and {len(fatal) - 1} more)" if len(fatal) > 1 else ""
        raise LlavaGgufError(f"{path} cannot be loaded: {fatal[0].code}: {fatal[0].message}{more}",
                             "`llava-gguf inspect` lists every defect; convert the model again")
    return header
