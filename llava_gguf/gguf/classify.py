"""What a GGUF file is: a LLaVA language model or an mmproj, its type in llama.cpp's spelling, and the
ONE rule for "is this file quantized" (its weight matrices are stored in a type other than F32, F16 or
BF16: the tensors are the truth, whatever the name or general.file_type say). Quantize, imatrix, quality,
verify and pairing all ask here."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.header import GGUFHeader, check_loadable
from llava_gguf.gguf.info import GGUFInfo, read_gguf_info
from llava_gguf.gguf.layout import GGUFLayout

# llama.cpp's llama_ftype ids under llama-quantize's names (QUANT_OPTIONS at the pinned commit, in its
# order; Q3_K, Q4_K and Q5_K are its aliases of the _M types): quantize/types.py adds the notes.
FILE_TYPES: dict[str, int] = {
    "Q1_0": 40, "Q2_0": 41, "Q4_0": 2, "Q4_1": 3, "MXFP4_MOE": 38, "Q5_0": 8, "Q5_1": 9, "IQ2_XXS": 19,
    "IQ2_XS": 20, "IQ2_S": 28, "IQ2_M": 29, "IQ1_S": 24, "IQ1_M": 31, "TQ1_0": 36, "TQ2_0": 37, "Q2_K": 10,
    "Q2_K_S": 21, "IQ3_XXS": 23, "IQ3_S": 26, "IQ3_M": 27, "Q3_K": 12, "IQ3_XS": 22, "Q3_K_S": 11,
    "Q3_K_M": 12, "Q3_K_L": 13, "IQ4_NL": 25, "IQ4_XS": 30, "Q4_K": 15, "Q4_K_S": 14, "Q4_K_M": 15,
    "Q5_K": 17, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7, "F16": 1, "BF16": 32, "F32": 0,
}
TYPE_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
FILE_TYPE_NAMES = {ftype: name for name, ftype in FILE_TYPES.items() if name not in TYPE_ALIASES}
# ggml types a weight matrix keeps when it is not quantized
FLOAT_GGML_TYPES = {0: "F32", 1: "F16", 30: "BF16"}
# unquantized first, most precise first: the order in which pairing prefers an mmproj
FLOAT_ORDER = ("F32", "F16", "BF16")

_TYPE_SUFFIX = re.compile(r"-(?:" + "|".join(sorted(FILE_TYPES, key=len, reverse=True)) + r")$", re.IGNORECASE)


def strip_type_suffix(stem: str) -> str:
    """A file stem without llama.cpp's type suffix: `llava-Q4_K_M` -> `llava` (any case)."""
    return _TYPE_SUFFIX.sub("", stem)


@dataclass(frozen=True)
class GGUFKind:
    path: Path
    kind: str  # "llm" | "mmproj"
    arch: str
    type: str  # the file's type in llama.cpp's spelling, e.g. F16, Q8_0 ("?" when not recorded)
    quantized: bool
    info: GGUFInfo  # width, template, image tokens: what the runtime reads
    header: GGUFHeader = field(repr=False, compare=False)  # the file as walked: what the load checks read again


def matrix_types(layout: GGUFLayout) -> set[int]:
    """The ggml types of the file's weight matrices (tensors with two or more dimensions above 1)."""
    return {t.type_id for t in layout.tensors if len([d for d in t.ne if d > 1]) >= 2}


def is_quantized(source: GGUFHeader | GGUFLayout | Path | str) -> bool:
    """Whether a GGUF (its header or layout, or a path) stores a weight matrix in a quantized type: the one
    rule every command uses (F32, F16 and BF16 are not quantized)."""
    if isinstance(source, GGUFHeader):
        source = source.layout
    layout = source if isinstance(source, GGUFLayout) else check_loadable(Path(source)).layout
    return any(t not in FLOAT_GGML_TYPES for t in matrix_types(layout))


def identify(path: Path | str) -> GGUFKind:
    """A GGUF's role by its architecture ("mmproj" for clip, "llm" for any other, "?" without one), type
    and quantization, for any file whose structure reads (pairing looks at every file in a directory);
    `classify` is the strict form."""
    path = Path(path)
    if not path.exists():
        raise LlavaGgufError(f"source {path} does not exist")
    # walked as gguf.cpp reads it (one-line errors for a cut or corrupt file, or a data section it refuses)
    header = check_loadable(path)
    info = read_gguf_info(path, "source", reader=header)
    arch = header.value("general.architecture") or "?"
    matrices = matrix_types(header.layout)
    ftype = header.value("general.file_type")
    if ftype is None:  # not recorded: the weight matrices' one float type, if they share one
        type_name = FLOAT_GGML_TYPES.get(next(iter(matrices)), "?") if len(matrices) == 1 else "?"
    else:
        whole = isinstance(ftype, int) or isinstance(ftype, float) and ftype.is_integer()
        type_name = FILE_TYPE_NAMES.get(int(ftype), "?") if whole else "?"
    kind = "mmproj" if arch == "clip" else "?" if arch == "?" else "llm"
    return GGUFKind(path, kind, arch, type_name, is_quantized(header), info, header)


def classify(path: Path | str) -> GGUFKind:
    """What a GGUF file is, for quantizing: a LLaVA language model or an mmproj; anything else is refused."""
    k = identify(path)
    path, arch = k.path, k.arch
    value = k.header.value  # a string that is not UTF-8 is decoded with replacement
    if (value("split.count") or 1) > 1:
        raise LlavaGgufError(f"{path} is one shard of a split GGUF",
                             "merge it first (llama.cpp's gguf-split --merge), then quantize the single file")
    if arch == "clip":
        if not value("clip.has_vision_encoder") or value("clip.projector_type") is None and not value("clip.has_llava_projector"):
            raise LlavaGgufError(f"{path} is a CLIP file without a vision encoder and projector, not an mmproj")
        return k
    if (value("general.type") or "model") != "model" or value("tokenizer.ggml.model") is None \
            or value(f"{arch}.block_count") is None or value(f"{arch}.embedding_length") is None:
        what = value("general.type") or ("an importance matrix" if "imatrix.datasets" in k.header else arch)
        raise LlavaGgufError(f"{path} is neither a LLaVA language model nor an mmproj ({what})",
                             "give the LLM or mmproj .gguf that `llava-gguf convert` wrote")
    return k
