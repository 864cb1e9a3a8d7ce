"""The `llava-gguf` command line. Each command parses, calls one library function, renders."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import LlavaGgufError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert LLaVA checkpoints from Hugging Face to GGUF and run them on llama.cpp.")


def _fail(e: LlavaGgufError) -> None:
    typer.echo(f"error: {e.one_line()}", err=True)
    raise typer.Exit(1)


def _command(fn):
    """Every command: an expected failure or Ctrl-C is one line on stderr and a non-zero exit."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LlavaGgufError as e:
            _fail(e)
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _print_json(obj: dict) -> None:
    """Every --json output: one single-line JSON object on the last line of stdout."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


@app.command()
@_command
def convert(
    src: Path = typer.Argument(..., help="Hugging Face checkpoint directory (llava-hf layout)"),
    outdir: Path = typer.Option(..., "-o", "--outdir", help="output directory (created if needed)"),
    outtype: str = typer.Option("f16", "--outtype", help="LLM type: f32, f16, bf16, q8_0, or any `quantize --list` type "
                                                           "(via a temporary F16 beside the outputs)"),
    mmproj_type: Optional[str] = typer.Option(None, "--mmproj-type",
                                              help="mmproj type: f32, f16, q8_0 (default: f32 for --outtype f32, else f16)"),
    name: Optional[str] = typer.Option(None, "--name", help="file-name stem (default: the source directory's name)"),
    force: bool = typer.Option(False, "--force", help="replace existing outputs"),
    clip: Optional[Path] = typer.Option(None, "--clip", help="the vision tower for a checkpoint without one (original "
                                        "liuhaotian layout): a local CLIPModel or CLIPVisionModel directory "
                                        "(default: the one mm_vision_tower names, from the Hugging Face cache)"),
    json_out: bool = typer.Option(False, "--json", help="print the result as one JSON line"),
) -> None:
    """Write OUTDIR/<name>-<TYPE>.gguf (LLM) and OUTDIR/mmproj-<name>-<TYPE>.gguf (vision tower + projector)."""
    from .convert import convert_checkpoint
    from .progress import convert_progress

    try:
        with convert_progress(enabled=sys.stdout.isatty() and not json_out) as progress:
            result = convert_checkpoint(src, outdir, outtype=outtype, mmproj_type=mmproj_type, name=name,
                                        force=force, progress=progress, clip=clip)
    except LlavaGgufError as e:
        _fail(e)
    if json_out:
        _print_json({"llm": str(result.llm), "mmproj": str(result.mmproj), "family": result.family,
                     "layout": result.layout, "tensors": result.tensors, "bytes": result.bytes_written})
    else:
        typer.echo(f"{result.family} ({result.layout} layout) -> {result.llm}")
        typer.echo(f"{' ' * len(result.family)}{' ' * (len(result.layout) + 10)} -> {result.mmproj}")


@app.command()
@_command
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
    from .progress import tensor_progress
    from .quantize import QUANT_TYPES, quantize_directory, quantize_gguf

    if list_types:
        for t in QUANT_TYPES:
            typer.echo(f"{t.name:8} {t.bpw:5.2f} bpw  {t.note}" + ("  (needs --imatrix)" if t.needs_imatrix else ""))
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
    if json_out:
        _print_json({"outputs": [{"path": str(r.output), "type": r.type, "bytes": r.bytes,
                                  "source": str(r.source) if r.source else None} for r in results]})
        return
    for r in results:
        how = f"from {r.source.name}" if r.source else "kept"
        typer.echo(f"{r.type:7} -> {r.output} ({r.bytes / 1e6:.1f} MB, {how})")


@app.command()
@_command
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
    from .quantize.imatrix import compute_imatrix

    r = compute_imatrix(model, out, text=text, images=images, mmproj=mmproj, n_ctx=n_ctx, chunks=chunks,
                        threads=threads, force=force, verbose=verbose)
    if json_out:
        _print_json({"output": str(r.output), "entries": r.entries, "chunks": r.chunks, "n_ctx": r.n_ctx,
                     "tokens": r.tokens, "dataset": r.dataset, "images": r.images})
    else:
        extra = f" and {r.images} images" if r.images else ""
        typer.echo(f"imatrix -> {r.output} ({r.entries} tensors, {r.chunks} chunks of {r.n_ctx} tokens{extra})")


@app.command()
@_command
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
    from .quality import measure_quality

    r = measure_quality(base, quant, mmproj=mmproj, base_mmproj=base_mmproj, images=images, prompts=prompts,
                        tokens=tokens, n_ctx=n_ctx, threads=threads)
    if json_out:
        _print_json(r.to_dict())
        return
    typer.echo(f"base   {r.base} + {Path(r.base_mmproj).name}")
    typer.echo(f"quant  {r.quant} + {Path(r.mmproj).name}")
    typer.echo(f"{r.pairs} prompts with images, {r.positions} answer positions")
    typer.echo(f"KL divergence   mean {r.kl_mean:.6f}  median {r.kl_median:.6f}  p99 {r.kl_p99:.6f}  max {r.kl_max:.6f}")
    typer.echo(f"top-1 agreement {100 * r.top1:.1f}%   identical greedy answers {r.same_answers}/{r.pairs}")
    if r.mmproj_cosine_mean is not None:
        typer.echo(f"image embedding cosine vs base mmproj: mean {r.mmproj_cosine_mean:.6f}  min {r.mmproj_cosine_min:.6f}")


@app.command()
@_command
def inspect(
    path: Path = typer.Argument(..., help="a checkpoint directory or a .gguf file (LLM or mmproj)"),
    clip: Optional[Path] = typer.Option(None, "--clip", help="a checkpoint's separate CLIP vision tower (as for convert)"),
    json_out: bool = typer.Option(False, "--json", help="one JSON line: the GGUF metadata as stored, plus derived fields"),
) -> None:
    """What a checkpoint or GGUF holds (family, layout, types, parameters, hparams), what convert would write,
    and for an mmproj the known defects that make its image features wrong or its load fail. Exits 1 when a
    defect is found."""
    from .inspection import inspect_path, render

    report = inspect_path(path, clip=clip)
    if json_out:
        _print_json(report)
    else:
        for line in render(report):
            typer.echo(line)
    if report["defects"]:
        raise typer.Exit(1)


@app.command()
@_command
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
    from .repair import repair_mmproj

    r = repair_mmproj(mmproj, out, force=force, feature_layer=feature_layer)
    if json_out:
        _print_json({"source": str(r.source), "output": str(r.output) if r.output else None, "fixed": list(r.fixed)})
    elif r.output is None:
        typer.echo(f"{mmproj}: nothing to repair")
    else:
        typer.echo(f"fixed {', '.join(r.fixed)} -> {r.output}")


@app.command("verify")
@_command
def verify_cmd(
    src: Path = typer.Argument(..., help="the Hugging Face checkpoint directory that was converted"),
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
    json_out: bool = typer.Option(False, "--json", help="print the report as one JSON line"),
) -> None:
    """Check a converted pair against the Hugging Face checkpoint in transformers: image-embedding cosine,
    next-token KL and top-1 agreement along transformers' greedy answer, identical greedy answers. Exits 1
    below the thresholds."""
    from .verify import verify

    r = verify(src, outdir, images=images, clip=clip, llm=model, mmproj=mmproj, tokens=tokens, runtime=runtime,
               min_cosine=min_cosine, min_top1=min_top1, threads=threads, reference_dtype=reference_dtype)
    if json_out:
        _print_json(r.to_dict())
    else:
        typer.echo(f"reference {r.source} (transformers, {r.reference_dtype})")
        typer.echo(f"gguf      {r.llm} + {Path(r.mmproj).name} ({r.runtime} libmtmd)")
        typer.echo(f"images    {len(r.images)}: {', '.join(r.images)}")
        typer.echo(f"image embedding cosine  mean {r.cosine_mean:.7f}  min {r.cosine_min:.7f}")
        typer.echo(f"next-token KL           mean {r.kl_mean:.6f}  max {r.kl_max:.6f}")
        typer.echo(f"top-1 agreement         {100 * r.top1:.1f}%   identical greedy answers {r.greedy_identical}/{len(r.images)}")
        typer.echo("PASS" if r.passed else "FAIL: " + "; ".join(r.failures))
    if not r.passed:
        raise typer.Exit(1)


@app.command()
@_command
def chat(
    path: Path = typer.Argument(..., help="directory that convert/quantize wrote, or an LLM .gguf"),
    image: Optional[list[str]] = typer.Option(None, "--image", help="image file (repeatable; - reads stdin)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="answer this once and exit (default: interactive)"),
    system: Optional[str] = typer.Option(None, "--system", help="system prompt"),
    model: Optional[Path] = typer.Option(None, "--model", help="the LLM .gguf, when the directory has several"),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="the mmproj .gguf"),
    # ranges are checked by the library (sampling_settings), so the CLI and the API say the same thing
    temp: float = typer.Option(0.2, "--temp", help="sampling temperature (0 = greedy)"),
    top_p: float = typer.Option(0.95, "--top-p", help="nucleus sampling, 0 to 1 (0: the most likely token)"),
    top_k: int = typer.Option(40, "--top-k", help="0: all tokens"),
    repeat_penalty: float = typer.Option(1.1, "--repeat-penalty", help="greater than 0 (1: none)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="0 to 4294967294 (default, -1 or 4294967295: random)"),
    max_tokens: int = typer.Option(256, "--max-tokens", help="at least 1"),
    n_ctx: Optional[int] = typer.Option(None, "--ctx", "--n-ctx", min=64, help="context size (default: fits the image)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    gpu_layers: Optional[int] = typer.Option(None, "--gpu-layers", help="layers to offload (-1: all)"),
    json_out: bool = typer.Option(False, "--json", help="with --prompt: one JSON object with text, counts, timings"),
    verbose: bool = typer.Option(False, "--verbose", help="llama.cpp's logs, and timings on stderr"),
) -> None:
    """Ask about images: with --prompt one answer streamed to stdout, otherwise an interactive chat."""
    from .runtime.locate import locate_pair
    from .runtime.model import LLaVA
    from .runtime.settings import check_text, sampling_settings

    if prompt is None and (json_out or "-" in (image or [])):
        raise LlavaGgufError("--json and --image - need --prompt", "the interactive session reads your questions from stdin")
    sampling = dict(temperature=temp, top_p=top_p, top_k=top_k, repeat_penalty=repeat_penalty, seed=seed,
                    max_tokens=max_tokens)
    sampling_settings(**sampling)  # a bad setting fails now, before anything loads
    for text, what in ((prompt, "the prompt"), (system, "the system prompt")):
        if text is not None:
            check_text(text, what)  # an argument that is not UTF-8 arrives surrogate-escaped
    images = [_read_image_arg(i) for i in image or []]
    from .runtime.images import load_image

    for im in images:
        load_image(im)  # a bad image fails now, before the model loads
    llm_path, mmproj_path = locate_pair(path, model, mmproj)
    with LLaVA(llm_path, mmproj_path, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=gpu_layers, seed=seed,
               verbose=verbose) as m:
        session = m.chat(system)
        if prompt is None:
            from .repl import run_repl

            run_repl(session, images, sampling, verbose=verbose)
            return
        pieces = session.ask(prompt, images, stream=True, **sampling)
        if json_out:
            text = "".join(pieces)
            st = m.last
            _print_json({"text": text.strip(), "prompt_tokens": st.prompt_tokens, "reused_tokens": st.reused_tokens,
                         "generated_tokens": st.generated_tokens, "images_encoded": st.images_encoded,
                         "prompt_seconds": round(st.prompt_seconds, 4),
                         "first_token_seconds": round(st.first_token_seconds, 4),
                         "generation_tokens_per_second": round(st.generation_tokens_per_second, 3)})
            return
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if verbose:
            typer.echo(_timings(m.last), err=True)


def _read_image_arg(arg: str):
    if arg == "-":
        data = sys.stdin.buffer.read()
        if not data:
            raise LlavaGgufError("--image - read nothing from stdin")
        return data
    return arg


def _timings(st) -> str:
    return (f"prompt: {st.prompt_tokens} tokens ({st.reused_tokens} from the cache, {st.evaluated_tokens} decoded, "
            f"{st.images_encoded} image(s) encoded) in {st.prompt_seconds:.2f} s, "
            f"{st.prompt_tokens_per_second:.1f} tok/s; first token after {st.first_token_seconds:.2f} s; "
            f"{st.generated_tokens} tokens at {st.generation_tokens_per_second:.1f} tok/s")


@app.command()
@_command
def doctor(json_out: bool = typer.Option(False, "--json", help="one JSON line")) -> None:
    """Versions, the native libraries in use, whether libmtmd carries the LLaVA fix, CPU features."""
    from .doctor import diagnose

    try:
        report = diagnose()
    except LlavaGgufError as e:
        _fail(e)
    if json_out:
        _print_json(report)
        return
    for key, value in report.items():
        if key == "system_info":
            continue
        if key == "llava_fix":
            value = "yes" if value else "NO (image features will not match the reference)"
        if isinstance(value, list):
            value = ", ".join(v if isinstance(v, str) else f"{v['name']} ({v['type']})" for v in value)
        typer.echo(f"{key:20} {value}")


@app.command()
@_command
def demo(
    model: Optional[Path] = typer.Option(None, "--model", help="a LLaVA checkpoint directory (default: the shipped "
                                         "shapes-llava)"),
    image: Optional[Path] = typer.Option(None, "--image", help="ask about your own image instead"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="the question for --image (default: Describe the "
                                         "image.)"),
    questions: int = typer.Option(24, "--questions", min=1, max=10000, help="test questions to ask"),
    json_out: bool = typer.Option(False, "--json", help="one JSON line with the results"),
) -> None:
    """Convert the shipped small LLaVA (trained here on synthetic shapes), quantize it to Q4_K_M and
    ask it questions about test images, with accuracy per file type; --image asks about yours. Image
    features are checked against the Hugging Face reference. --model: any checkpoint, one question."""
    from .demo import run_demo

    try:
        result = run_demo(model, image, prompt, echo=(lambda s: None) if json_out else typer.echo,
                          questions=questions)
    except LlavaGgufError as e:
        _fail(e)
    if json_out:
        _print_json(result)


def _quiet_libraries() -> None:
    """gguf-py and transformers log warnings about checkpoint quirks they handle; the CLI's output
    stays ours (llama.cpp's own logs are hidden the same way unless --verbose)."""
    import logging
    import os

    if "--verbose" in sys.argv[1:]:
        return
    for name in ("gguf", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _one_line_warnings() -> None:
    """Every warning the CLI shows is one line on stderr: ours as `warning: <text>`, anything a library
    raises through Python's warnings as `warning: <Category>: <text>` (no source line, no path)."""
    import warnings

    from .errors import LlavaGgufWarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        text = " ".join(str(message).split())
        if not issubclass(category, LlavaGgufWarning):
            text = f"{category.__name__}: {text}"
        try:
            sys.stderr.write(f"warning: {text}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    warnings.showwarning = show


def _click_exceptions():
    """typer >= 0.17 carries its own copy of click; older ones use click itself."""
    try:
        from typer._click import exceptions as cx
        from typer.exceptions import Abort
    except ImportError:  # pragma: no cover - depends on the typer version
        from click import exceptions as cx
        from click.exceptions import Abort
    return cx, Abort


def main() -> None:
    cx, Abort = _click_exceptions()
    _quiet_libraries()
    _one_line_warnings()
    try:
        rv = app(standalone_mode=False)
    except cx.NoArgsIsHelpError:
        raise SystemExit(0) from None  # the help has been shown
    except cx.UsageError as e:
        # click's usage errors span several lines; ours are one, like every other error
        where = f" (see {e.ctx.command_path} --help)" if e.ctx else ""
        typer.echo(f"error: {' '.join(e.format_message().split())}{where}", err=True)
        raise SystemExit(2) from None
    except cx.ClickException as e:
        typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
        raise SystemExit(e.exit_code) from None
    except (KeyboardInterrupt, Abort):
        typer.echo("error: interrupted", err=True)
        rv = 130
    if rv == 130:
        # Interrupted: outputs are already cleaned up. Exit now rather than wait for native work that
        # cannot be stopped (a quantizer thread) to finish.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    raise SystemExit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
