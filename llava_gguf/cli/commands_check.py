"""The commands that examine: inspect, verify, quality, doctor. Each parses its options, calls one library
function and renders its report (cli/render.py); cli/app.py registers them. inspect and verify exit 1
when the report finds a defect or a failed threshold."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from llava_gguf.checks.inspect import inspect_report
from llava_gguf.checks.quality import measure_quality
from llava_gguf.checks.verify import verify
from llava_gguf.cli.render import doctor_lines, inspect_lines, quality_lines, show, to_json, verify_lines
from llava_gguf.native.doctor import diagnose


def quality(
    base: Path = typer.Argument(..., help="the unquantized language model (e.g. <name>-F16.gguf)"),
    quant: Path = typer.Argument(..., help="the quantized language model (e.g. <name>-Q4_K_M.gguf)"),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="the quantized pair's mmproj (default: the base one)"),
    base_mmproj: Optional[Path] = typer.Option(None, "--base-mmproj",
                                               help="the base pair's mmproj (default: the unquantized one beside BASE)"),
    images: Optional[Path] = typer.Option(None, "--images", help="directory of images (default: 3 generated ones)"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="text file, one prompt per line (default: 4 built-in)"),
    tokens: int = typer.Option(32, "--tokens", min=1, help="answer positions compared per prompt"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    n_ctx: Optional[int] = typer.Option(None, "--n-ctx", min=64, help="context size (default: fits the image)"),
    json_out: bool = typer.Option(False, "--json", help="print the report as one JSON line"),
) -> None:
    """How far a quantized model's answers moved: next-token KL divergence and top-1 agreement along
    the base model's answers, and the image-embedding cosine of a quantized mmproj."""
    r = measure_quality(base, quant, mmproj=mmproj, base_mmproj=base_mmproj, images=images, prompts=prompts,
                        tokens=tokens, n_ctx=n_ctx, threads=threads)
    show(json_out, r, to_json, quality_lines)


def inspect(
    path: str = typer.Argument(..., help="a checkpoint directory, a Hub repo id (ORG/NAME, as for convert) or a "
                               ".gguf file (LLM or mmproj)"),
    clip: Optional[Path] = typer.Option(None, "--clip", help="a checkpoint's separate CLIP vision tower (as for convert)"),
    revision: Optional[str] = typer.Option(None, "--revision", help="with a Hub repo id: the branch, tag or commit"),
    json_out: bool = typer.Option(False, "--json", help="one JSON line: the GGUF metadata as stored, plus derived fields"),
) -> None:
    """What a checkpoint or GGUF holds (family, layout, types, parameters, hparams), what convert would write,
    and for an mmproj the known defects that make its image features wrong or its load fail. Exits 1 when a
    defect is found."""
    report = inspect_report(path, clip=clip, revision=revision)
    show(json_out, report, to_json, inspect_lines)
    if report.defects:
        raise typer.Exit(1)


def verify_cmd(
    src: str = typer.Argument(..., help="the Hugging Face checkpoint that was converted: a directory or a Hub repo "
                              "id (ORG/NAME, as for convert)"),
    outdir: Path = typer.Argument(..., help="the directory convert/quantize wrote (or an LLM .gguf)"),
    images: Optional[Path] = typer.Option(None, "--images", help="a directory of images (default: 3 built-in samples)"),
    clip: Optional[Path] = typer.Option(None, "--clip", help="SRC's separate CLIP vision tower (as for convert)"),
    model: Optional[Path] = typer.Option(None, "--model", help="the LLM .gguf, when OUTDIR has several"),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="the mmproj .gguf, when OUTDIR has several"),
    tokens: int = typer.Option(16, "--tokens", min=1, help="answer tokens compared per image"),
    runtime: str = typer.Option("fixed", "--runtime", help="fixed (ours) or stock (unpatched libmtmd, as other "
                                "llama.cpp-based apps run the same files)"),
    min_cosine: Optional[float] = typer.Option(None, "--min-cosine", help="default 0.999 (0.99 for a quantized mmproj)"),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", help="default 0.95 (0.80 for a quantized LLM)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    reference_dtype: str = typer.Option("auto", "--reference-dtype", help="transformers' language model in float32 "
                                        "or bfloat16 (auto: float32 when it fits in memory; the vision tower and "
                                        "projector always float32)"),
    revision: Optional[str] = typer.Option(None, "--revision", help="with a Hub repo id: the branch, tag or commit"),
    json_out: bool = typer.Option(False, "--json", help="print the report as one JSON line"),
) -> None:
    """Check a converted pair against the Hugging Face checkpoint in transformers: image-embedding cosine,
    next-token KL and top-1 agreement along transformers' greedy answer, identical greedy answers. Exits 1
    below the thresholds."""
    r = verify(src, outdir, images=images, clip=clip, llm=model, mmproj=mmproj, tokens=tokens, runtime=runtime,
               min_cosine=min_cosine, min_top1=min_top1, threads=threads, reference_dtype=reference_dtype,
               revision=revision)
    show(json_out, r, to_json, verify_lines)
    if not r.passed:
        raise typer.Exit(1)


def doctor(json_out: bool = typer.Option(False, "--json", help="one JSON line")) -> None:
    """Versions, the native libraries in use, whether libmtmd carries the LLaVA fix, CPU features."""
    report = diagnose()
    show(json_out, report, to_json, doctor_lines)
