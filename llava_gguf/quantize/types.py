"""llama-quantize's quantization types (its QUANT_OPTIONS at the pinned commit), the types an mmproj is
quantized to, and the output file's name (`x-F16.gguf` -> `x-Q4_K_M.gguf`, llama.cpp's spelling). The
type ids are gguf/classify.py's FILE_TYPES: one table for the quantizer and for reading a file's type."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.classify import FILE_TYPES, TYPE_ALIASES, strip_type_suffix


@dataclass(frozen=True)
class QuantType:
    name: str  # llama.cpp's spelling
    ftype: int  # llama_ftype
    note: str  # llama-quantize's own one-line description
    needs_imatrix: bool = False

    @property
    def bpw(self) -> float:
        """Bits per weight of a whole model: llama-quantize's Llama-3-8B sizes (GiB over 8.03e9 weights)
        where its note gives one, else the note's own bpw, else the storage type's."""
        name = TYPE_ALIASES.get(self.name, self.name)
        note = next(t.note for t in QUANT_TYPES if t.name == name)
        m = re.match(r"([\d.]+)G, .* @ Llama-3-8B", note)
        if m:
            return float(m.group(1)) * 2**30 * 8 / 8.03e9
        m = re.match(r"([\d.]+) bpw", note)
        return float(m.group(1)) if m else {"F16": 16.0, "BF16": 16.0, "F32": 32.0, "MXFP4_MOE": 8.5}[name]


# llama-quantize's own notes, in its order; True where src/llama-quant.cpp refuses to run without an
# importance matrix
_NOTES: tuple[tuple[str, str, bool], ...] = (
    ("Q1_0", "1.125 bpw quantization", False),
    ("Q2_0", "2.25 bpw quantization (group 64)", False),
    ("Q4_0", "4.34G, +0.4685 ppl @ Llama-3-8B", False),
    ("Q4_1", "4.78G, +0.4511 ppl @ Llama-3-8B", False),
    ("MXFP4_MOE", "MXFP4 for mixture-of-experts tensors (LLaVA has none: Q8_0 elsewhere)", False),
    ("Q5_0", "5.21G, +0.1316 ppl @ Llama-3-8B", False),
    ("Q5_1", "5.65G, +0.1062 ppl @ Llama-3-8B", False),
    ("IQ2_XXS", "2.06 bpw quantization", True),
    ("IQ2_XS", "2.31 bpw quantization", True),
    ("IQ2_S", "2.5 bpw quantization", True),
    ("IQ2_M", "2.7 bpw quantization", True),
    ("IQ1_S", "1.56 bpw quantization", True),
    ("IQ1_M", "1.75 bpw quantization", True),
    ("TQ1_0", "1.69 bpw ternarization", False),
    ("TQ2_0", "2.06 bpw ternarization", False),
    ("Q2_K", "2.96G, +3.5199 ppl @ Llama-3-8B", False),
    ("Q2_K_S", "2.96G, +3.1836 ppl @ Llama-3-8B", True),
    ("IQ3_XXS", "3.06 bpw quantization", True),
    ("IQ3_S", "3.44 bpw quantization", False),
    ("IQ3_M", "3.66 bpw quantization mix", False),
    ("Q3_K", "alias for Q3_K_M", False),
    ("IQ3_XS", "3.3 bpw quantization", True),
    ("Q3_K_S", "3.41G, +1.6321 ppl @ Llama-3-8B", False),
    ("Q3_K_M", "3.74G, +0.6569 ppl @ Llama-3-8B", False),
    ("Q3_K_L", "4.03G, +0.5562 ppl @ Llama-3-8B", False),
    ("IQ4_NL", "4.50 bpw non-linear quantization", False),
    ("IQ4_XS", "4.25 bpw non-linear quantization", False),
    ("Q4_K", "alias for Q4_K_M", False),
    ("Q4_K_S", "4.37G, +0.2689 ppl @ Llama-3-8B", False),
    ("Q4_K_M", "4.58G, +0.1754 ppl @ Llama-3-8B", False),
    ("Q5_K", "alias for Q5_K_M", False),
    ("Q5_K_S", "5.21G, +0.1049 ppl @ Llama-3-8B", False),
    ("Q5_K_M", "5.33G, +0.0569 ppl @ Llama-3-8B", False),
    ("Q6_K", "6.14G, +0.0217 ppl @ Llama-3-8B", False),
    ("Q8_0", "7.96G, +0.0026 ppl @ Llama-3-8B", False),
    ("F16", "14.00G, +0.0020 ppl @ Mistral-7B", False),
    ("BF16", "14.00G, -0.0050 ppl @ Mistral-7B", False),
    ("F32", "26.00G @ 7B", False),
)
QUANT_TYPES: tuple[QuantType, ...] = tuple(QuantType(name, FILE_TYPES[name], note, needs)
                                           for name, note, needs in _NOTES)

# mmproj (CLIP) files: llama_model_quantize takes them too; these are the types whose result we have
# seen load and run in libmtmd (tests: Q8_0 image-embedding cosine >= 0.99 against F16, Q4_K_M >= 0.98).
MMPROJ_QUANT_TYPES = ("F32", "F16", "Q8_0", "Q4_K_M")
MMPROJ_CHOICES = ("keep",) + tuple(t.lower() for t in MMPROJ_QUANT_TYPES)


def find_type(name: str) -> QuantType:
    for t in QUANT_TYPES:
        if t.name.lower() == name.lower():
            return t
    raise LlavaGgufError(f"unknown quantization type {name!r}", "`llava-gguf quantize --list` shows them all")


def output_path(src: Path, qtype: QuantType) -> Path:
    """`x-F16.gguf` -> `x-Q4_K_M.gguf` beside the source (llama.cpp's spelling)."""
    return src.with_name(f"{strip_type_suffix(src.stem)}-{qtype.name}.gguf")
