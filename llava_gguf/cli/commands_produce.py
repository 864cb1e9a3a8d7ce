"""The commands that write files: convert, quantize, imatrix, repair. Each parses its options, calls one
library function and renders its result (cli/render.py); cli/app.py registers them."""
from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Optional

import typer

from llava_gguf.cli.progress import convert_progress, imatrix_progress, tensor_progress
from llava_gguf.cli.render import (convert_json, convert_lines, imatrix_json, imatrix_lines, quant_type_lines,
                                   quant_types_json, quantize_json, quantize_lines, repair_json, repair_lines, show)
from llava_gguf.convert import check_output_types, convert_checkpoint, resolve_checkpoint
from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.repair import repair_mmproj
from llava_gguf.quantize import QUANT_TYPES, quantize_directory, quantize_gguf
from llava_gguf.runtime.imatrix import compute_imatrix


def convert(
    src: str = typer.Argument(..., help="Hugging Face checkpoint directory (llava-hf or original layout), or a Hub "
                              "repo id (ORG/NAME, downloaded into the Hugging Face cache; a local path wins)"),
    outdir: Path = typer.Option(..., "-o", "--outdir", help="output directory (created if needed)"),
    outtype: str = typer.Option("f16", "--outtype", help="LLM type: f32, f16, bf16, q8_0, or any `quantize --list` type "
                                                           "(via a temporary F16 beside the outputs)"),
    mmproj_type: Optional[str] = typer.Option(None, "--mmproj-type",
                                              help="mmproj type: f32, f16, q8_0 (default: f32 for --outtype f32, else f16)"),
    name: Optional[str] = typer.Option(None, "--name", help="file-name stem (default: the source directory's name, "
                                       "NAME for ORG/NAME)"),
    revision: Optional[str] = typer.Option(None, "--revision", help="with a Hub repo id: the branch, tag or commit "
                                           "(default: main)"),
    force: bool = typer.Option(False, "--force", help="replace existing outputs"),
    clip: Optional[Path] = typer.Option(None, "--clip", help="the vision tower for a checkpoint without one (original "
                                        "liuhaotian layout): a local CLIPModel or CLIPVisionModel directory "
                                        "(default: the one mm_vision_tower names, fetched from the Hub or its cache)"),
    json_out: bool = typer.Option(False, "--json", help="print the result as one JSON line"),
) -> None:
    """Write OUTDIR/<name>-<TYPE>.gguf (LLM) and OUTDIR/mmproj-<name>-<TYPE>.gguf (vision tower + projector)."""
    # a Hub download first (its options checked before it), outside the progress display: huggingface_hub
    # draws its own bars on stderr
    check_output_types(outtype, mmproj_type)
    checkpoint = resolve_checkpoint(src, revision)
    with convert_progress(enabled=sys.stdout.isatty() and not json_out) as progress:
        result = convert_checkpoint(checkpoint, outdir, outtype=outtype, mmproj_type=mmproj_type, name=name,
                                    force=force, progress=progress, clip=clip)
    show(json_out, result, convert_json, convert_lines)


def quantize(
    src: Optional[Path] = typer.Argument(None, help="an LLM or mmproj .gguf, or a directory that convert wrote"),
    type_name: Optional[str] = typer.Option(None, "--type", help="llama.cpp type, e.g. Q4_K_M (case-insensitive)"),
    out: Optional[Path] = typer.Option(None, "-o", "--output",
                                       help="output file (SRC a file) or directory (SRC a directory); default: beside SRC"),
    mmproj_type: str = typer.Option("keep", "--mmproj-type",
                                    help="SRC a directory: keep the mmproj, or quantize it to f32, f16, q8_0, q4_k_m"),
    imatrix: Optional[str] = typer.Option(None, "--imatrix", help="importance matrix (llava-gguf imatrix)"),
    allow_requantize: bool = typer.Option(False, "--allow-requantize", help="accept an already quantized source"),
    leave_output_tensor: bool = typer.Option(False, "--leave-output-tensor", help="keep output.weight unquantized"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    force: bool = typer.Option(False, "--force", help="replace an existing output"),
    list_types: bool = typer.Option(False, "--list", help="list the types and exit"),
    verbose: bool = typer.Option(False, "--verbose", help="show llama.cpp's logs"),
    json_out: bool = typer.Option(False, "--json", help="print the result as one JSON line"),
) -> None:
    """Quantize with llama.cpp's quantizer, in process: an LLM or mmproj GGUF, or the pair in a directory."""
    if list_types:
        show(json_out, QUANT_TYPES, quant_types_json, quant_type_lines)
        return
    if src is None or type_name is None:
        raise LlavaGgufError("quantize needs SRC and --type", "or --list to see the types")
    options = dict(threads=threads, allow_requantize=allow_requantize, leave_output_tensor=leave_output_tensor,
                   imatrix=imatrix, force=force, verbose=verbose)
    with tensor_progress(sys.stderr.isatty() and not verbose and not json_out, "quantizing") as progress:
        if src.is_dir():
            results = quantize_directory(src, type_name, out, mmproj_type=mmproj_type, progress=progress, **options)
        else:
            if mmproj_type.lower() != "keep":
                raise LlavaGgufError("--mmproj-type applies when SRC is a directory",
                                     "to quantize an mmproj file, give it as SRC with --type")
            results = [quantize_gguf(src, type_name, out, progress=progress, **options)]
    show(json_out, results, quantize_json, quantize_lines)


def imatrix(
    model: Path = typer.Argument(..., help="the unquantized language-model .gguf (e.g. <name>-F16.gguf)"),
    out: Path = typer.Option(..., "-o", "--output", help="the importance matrix to write (.gguf)"),
    text: Optional[Path] = typer.Option(None, "--text", help="calibration text (default: a built-in one)"),
    images: Optional[Path] = typer.Option(None, "--images", help="also calibrate on these images (a directory)"),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="with --images: the mmproj (default: the one beside MODEL)"),
    n_ctx: Optional[int] = typer.Option(None, "--ctx", min=32, help="tokens per chunk (default: 512, less for short text)"),
    chunks: Optional[int] = typer.Option(None, "--chunks", min=1, help="at most this many chunks (default: all)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    force: bool = typer.Option(False, "--force", help="replace an existing output"),
    verbose: bool = typer.Option(False, "--verbose", help="show llama-imatrix's log"),
    json_out: bool = typer.Option(False, "--json", help="print the result as one JSON line"),
) -> None:
    """Compute an importance matrix (llama.cpp's llama-imatrix) for `quantize --imatrix`: IQ types and
    better K-quants."""
    with imatrix_progress(sys.stdout.isatty() and not json_out and not verbose) as progress:
        r = compute_imatrix(model, out, text=text, images=images, mmproj=mmproj, n_ctx=n_ctx, chunks=chunks,
                            threads=threads, force=force, verbose=verbose, progress=progress)
    show(json_out, r, imatrix_json, imatrix_lines)


def repair(
    mmproj: Path = typer.Argument(..., help="an mmproj .gguf made elsewhere (e.g. by llama.cpp's legacy LLaVA scripts)"),
    out: Optional[Path] = typer.Option(None, "-o", "--output", help="write here instead of rewriting MMPROJ in place"),
    feature_layer: Optional[int] = typer.Option(None, "--feature-layer", min=1,
                                                help="for a file without one: the layer to write (default: the stored "
                                                     "block count, what the legacy route meant)"),
    force: bool = typer.Option(False, "--force", help="replace an existing --output"),
    json_out: bool = typer.Option(False, "--json", help="print the result as one JSON line"),
) -> None:
    """Fix an mmproj's repairable defects (see `inspect`), atomically: the file is rewritten through a
    temporary file, or written to --output."""
    r = repair_mmproj(mmproj, out, force=force, feature_layer=feature_layer)
    show(json_out, r, repair_json, partial(repair_lines, given=mmproj))
