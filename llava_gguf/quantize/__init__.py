"""`quantize`: llama.cpp's quantizer, in process through llama-cpp-python's `llama_model_quantize` binding
on our own libraries (the same code `llama-quantize` runs, so the output is the same bytes), with our
atomic-output rules and file naming."""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import LlavaGgufError
from ..outputs import atomic_outputs


@dataclass(frozen=True)
class QuantType:
    name: str  # llama.cpp's spelling
    ftype: int  # llama_ftype
    note: str  # llama-quantize's own one-line description
    needs_imatrix: bool = False


# llama-quantize's QUANT_OPTIONS at the pinned commit (tools/quantize/quantize.cpp), in its order;
# needs_imatrix where src/llama-quant.cpp refuses to run without one.
QUANT_TYPES: tuple[QuantType, ...] = (
    QuantType("Q4_0", 2, "4.34G, +0.4685 ppl @ Llama-3-8B"),
    QuantType("Q4_1", 3, "4.78G, +0.4511 ppl @ Llama-3-8B"),
    QuantType("Q5_0", 8, "5.21G, +0.1316 ppl @ Llama-3-8B"),
    QuantType("Q5_1", 9, "5.65G, +0.1062 ppl @ Llama-3-8B"),
    QuantType("IQ2_XXS", 19, "2.06 bpw quantization", True),
    QuantType("IQ2_XS", 20, "2.31 bpw quantization", True),
    QuantType("IQ2_S", 28, "2.5 bpw quantization", True),
    QuantType("IQ2_M", 29, "2.7 bpw quantization", True),
    QuantType("IQ1_S", 24, "1.56 bpw quantization", True),
    QuantType("IQ1_M", 31, "1.75 bpw quantization", True),
    QuantType("TQ1_0", 36, "1.69 bpw ternarization"),
    QuantType("TQ2_0", 37, "2.06 bpw ternarization"),
    QuantType("Q2_K", 10, "2.96G, +3.5199 ppl @ Llama-3-8B"),
    QuantType("Q2_K_S", 21, "2.96G, +3.1836 ppl @ Llama-3-8B", True),
    QuantType("IQ3_XXS", 23, "3.06 bpw quantization", True),
    QuantType("IQ3_S", 26, "3.44 bpw quantization"),
    QuantType("IQ3_M", 27, "3.66 bpw quantization mix"),
    QuantType("Q3_K", 12, "alias for Q3_K_M"),
    QuantType("IQ3_XS", 22, "3.3 bpw quantization", True),
    QuantType("Q3_K_S", 11, "3.41G, +1.6321 ppl @ Llama-3-8B"),
    QuantType("Q3_K_M", 12, "3.74G, +0.6569 ppl @ Llama-3-8B"),
    QuantType("Q3_K_L", 13, "4.03G, +0.5562 ppl @ Llama-3-8B"),
    QuantType("IQ4_NL", 25, "4.50 bpw non-linear quantization"),
    QuantType("IQ4_XS", 30, "4.25 bpw non-linear quantization"),
    QuantType("Q4_K", 15, "alias for Q4_K_M"),
    QuantType("Q4_K_S", 14, "4.37G, +0.2689 ppl @ Llama-3-8B"),
    QuantType("Q4_K_M", 15, "4.58G, +0.1754 ppl @ Llama-3-8B"),
    QuantType("Q5_K", 17, "alias for Q5_K_M"),
    QuantType("Q5_K_S", 16, "5.21G, +0.1049 ppl @ Llama-3-8B"),
    QuantType("Q5_K_M", 17, "5.33G, +0.0569 ppl @ Llama-3-8B"),
    QuantType("Q6_K", 18, "6.14G, +0.0217 ppl @ Llama-3-8B"),
    QuantType("Q8_0", 7, "7.96G, +0.0026 ppl @ Llama-3-8B"),
    QuantType("F16", 1, "14.00G, +0.0020 ppl @ Mistral-7B"),
    QuantType("BF16", 32, "14.00G, -0.0050 ppl @ Mistral-7B"),
    QuantType("F32", 0, "26.00G @ 7B"),
)

# mmproj (CLIP) files: llama_model_quantize takes them too; these are the types whose result we have
# seen load and run in libmtmd (tests: Q8_0 image-embedding cosine >= 0.99 against F16, Q4_K_M >= 0.98).
MMPROJ_QUANT_TYPES = ("F32", "F16", "Q8_0", "Q4_K_M")

_TYPE_SUFFIX = re.compile(r"-(?:" + "|".join(sorted((t.name for t in QUANT_TYPES), key=len, reverse=True))
                          + r")$", re.IGNORECASE)


def find_type(name: str) -> QuantType:
    for t in QUANT_TYPES:
        if t.name.lower() == name.lower():
            return t
    raise LlavaGgufError(f"unknown quantization type {name!r}", "`llava-gguf quantize --list` shows them all")


def output_path(src: Path, qtype: QuantType) -> Path:
    """`x-F16.gguf` -> `x-Q4_K_M.gguf` beside the source (llama.cpp's spelling)."""
    stem = _TYPE_SUFFIX.sub("", src.stem)
    return src.with_name(f"{stem}-{qtype.name}.gguf")


@dataclass(frozen=True)
class QuantizeResult:
    output: Path
    type: str
    bytes: int


def quantize_gguf(src: Path | str, type_name: str, out: Path | str | None = None, *, threads: int | None = None,
                  allow_requantize: bool = False, leave_output_tensor: bool = False, force: bool = False,
                  verbose: bool = False) -> QuantizeResult:
    """Quantize a language-model or mmproj GGUF to `type_name`; the output appears atomically."""
    from ..runtime import native
    from ..runtime.model import read_gguf_info

    src = Path(src)
    qtype = find_type(type_name)
    if qtype.needs_imatrix:
        raise LlavaGgufError(f"{qtype.name} needs an importance matrix, which this version cannot compute yet",
                             "choose a type that does not, such as Q4_K_M (see --list)")
    info = read_gguf_info(src, "model")
    if info.arch == "clip" and qtype.name not in MMPROJ_QUANT_TYPES:
        raise LlavaGgufError(f"{src} is an mmproj file, which is quantized to {', '.join(MMPROJ_QUANT_TYPES)} only",
                             "other types are not shown to load and run in libmtmd")
    dest = Path(out) if out is not None else output_path(src, qtype)
    if dest.resolve() == src.resolve():
        raise LlavaGgufError(f"the output would replace the source {src}", "choose another name with -o")
    native.configure()
    native.quiet_logs(verbose)
    lc = native.llama_cpp()
    with atomic_outputs(dest.parent, [dest.name], force=force) as outputs:
        partial = outputs.partials[0]
        params = lc.llama_model_quantize_default_params()
        params.nthread = threads or 0
        params.ftype = qtype.ftype
        params.allow_requantize = allow_requantize
        params.quantize_output_tensor = not leave_output_tensor
        rc = lc.llama_model_quantize(str(src).encode(), str(partial).encode(), ctypes.byref(params))
        if rc != 0:
            raise LlavaGgufError(f"llama.cpp could not quantize {src} to {qtype.name}",
                                 "already quantized? pass --allow-requantize; --verbose shows llama.cpp's log")
    return QuantizeResult(dest, qtype.name, dest.stat().st_size)
