"""`quantize`: llama.cpp's quantizer, in process, with our atomic-output rules and file naming: a single
GGUF (`quantize_gguf`) or the pair in a directory `convert` wrote (`quantize_directory`: its unquantized
LLM, its mmproj kept or quantized, both outputs together or neither).

types.py holds llama-quantize's types and the output naming, job.py one planned quantization (public:
`convert --outtype` runs one), imatrix.py the importance matrices llama-quantize reads."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.output_errors import write_error
from llava_gguf.gguf.outputs import atomic_outputs
from llava_gguf.gguf.pairing import quantize_sources
from llava_gguf.quantize.job import Progress, QuantizeJob
from llava_gguf.quantize.types import (MMPROJ_CHOICES, MMPROJ_QUANT_TYPES, QUANT_TYPES, QuantType, find_type,
                                       output_path)

__all__ = ["MMPROJ_CHOICES", "MMPROJ_QUANT_TYPES", "QUANT_TYPES", "Progress", "QuantType", "QuantizeJob",
           "QuantizeResult", "find_type", "output_path", "quantize_directory", "quantize_gguf"]


@dataclass(frozen=True)
class QuantizeResult:
    output: Path
    type: str
    bytes: int
    source: Path | None = None  # None when the output is a copy of a kept file


def quantize_gguf(src: Path | str, type_name: str, out: Path | str | None = None, *, threads: int | None = None,
                  allow_requantize: bool = False, leave_output_tensor: bool = False, imatrix: str | Path | None = None,
                  force: bool = False, verbose: bool = False, progress: Progress | None = None) -> QuantizeResult:
    """Quantize a language-model or mmproj GGUF to `type_name`; the output appears atomically."""
    src = Path(src)
    qtype = find_type(type_name)
    job = QuantizeJob.plan(src, qtype, allow_requantize=allow_requantize, imatrix=imatrix)
    dest = Path(out) if out is not None else output_path(src, qtype)
    if dest.is_dir():
        dest = dest / output_path(src, qtype).name
    _not_the_source(dest, src)
    with atomic_outputs(dest.parent, [dest.name], force=force) as outputs:
        job.run(outputs.paths[0], threads=threads, leave_output_tensor=leave_output_tensor, verbose=verbose,
                progress=progress, target=dest, on_abandon=outputs.park)
    return QuantizeResult(dest, qtype.name, dest.stat().st_size, src)


def _not_the_source(dest: Path, src: Path) -> None:
    if dest.exists() and dest.resolve() == src.resolve():
        raise LlavaGgufError(f"the output would replace the source {src}", "choose another output with -o")


def quantize_directory(src: Path | str, type_name: str, outdir: Path | str | None = None, *,
                       mmproj_type: str = "keep", threads: int | None = None, allow_requantize: bool = False,
                       leave_output_tensor: bool = False, imatrix: str | Path | None = None, force: bool = False,
                       verbose: bool = False, progress: Progress | None = None) -> list[QuantizeResult]:
    """A directory `convert` wrote: its (unquantized) LLM to `type_name`, and its mmproj kept (copied when
    OUTDIR is elsewhere) or quantized per `mmproj_type`. Both outputs appear together or not at all."""
    src = Path(src)
    outdir = Path(outdir) if outdir is not None else src
    qtype = find_type(type_name)
    mm_choice = mmproj_type.lower()
    if mm_choice not in MMPROJ_CHOICES:
        raise LlavaGgufError(f"unknown --mmproj-type {mmproj_type!r}", f"choose one of {', '.join(MMPROJ_CHOICES)}")
    llm, mmproj = quantize_sources(src)
    job = QuantizeJob.plan(llm.path, qtype, allow_requantize=allow_requantize, imatrix=imatrix)
    mm_job = None
    mm_dest = outdir / mmproj.path.name
    if mm_choice != "keep" and find_type(mm_choice).name != mmproj.type:
        mm_qtype = find_type(mm_choice)
        mm_job = QuantizeJob.plan(mmproj.path, mm_qtype, allow_requantize=allow_requantize, imatrix=None)
        mm_dest = outdir / output_path(mmproj.path, mm_qtype).name
    names = [output_path(llm.path, qtype).name]
    _not_the_source(outdir / names[0], llm.path)
    if mm_job is not None:
        _not_the_source(mm_dest, mmproj.path)
    copy_mmproj = mm_job is None and mm_dest.resolve() != mmproj.path.resolve()
    if mm_job is not None or copy_mmproj:
        names.append(mm_dest.name)
    with atomic_outputs(outdir, names, force=force) as outputs:
        job.run(outputs.paths[0], threads=threads, leave_output_tensor=leave_output_tensor, verbose=verbose,
                progress=progress, target=outdir / names[0], on_abandon=outputs.park)
        if mm_job is not None:
            mm_job.run(outputs.paths[1], threads=threads, leave_output_tensor=False, verbose=verbose,
                       progress=progress, target=mm_dest, on_abandon=outputs.park)
        elif copy_mmproj:
            try:
                with open(mmproj.path, "rb") as fin:
                    with outputs.open_write(1) as fout:  # into our temporary, never by name
                        shutil.copyfileobj(fin, fout, 2**20)
            except OSError as e:
                raise write_error(e, mm_dest) from None
    results = [QuantizeResult(outdir / names[0], qtype.name, (outdir / names[0]).stat().st_size, llm.path)]
    if mm_job is not None:
        results.append(QuantizeResult(mm_dest, mm_job.qtype.name, mm_dest.stat().st_size, mmproj.path))
    else:
        results.append(QuantizeResult(mm_dest, mmproj.type, mm_dest.stat().st_size, None))
    return results

