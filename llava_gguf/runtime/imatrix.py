"""`imatrix`: an importance matrix computed with llama.cpp's `llama-imatrix` tool (built by our CMake)
over a calibration text, and optionally images through the mmproj (native/patches/0002). The file it
writes is read back by quantize/imatrix.py, as llama-quantize reads it."""
from __future__ import annotations

import codecs
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llava_gguf.errors import LlavaGgufError
from llava_gguf.families import default_chat_template
from llava_gguf.gguf.classify import classify
from llava_gguf.gguf.defects import require_loadable
from llava_gguf.gguf.info import GGUFInfo
from llava_gguf.gguf.output_errors import native_write_error
from llava_gguf.gguf.outputs import atomic_outputs
from llava_gguf.gguf.pairing import find_base_mmproj
from llava_gguf.native import library as native
from llava_gguf.quantize.imatrix import load_imatrix
from llava_gguf.runtime.images import image_files, load_image
from llava_gguf.runtime.prompt import IMAGE_PLACEHOLDER, Message, render_with_images
from llava_gguf.settings import IMAGE_PROMPTS


@dataclass(frozen=True)
class ImatrixResult:
    output: Path
    entries: int
    chunks: int
    n_ctx: int
    tokens: int
    dataset: str
    images: int = 0


# llama-imatrix's only per-step output: "[k]<perplexity>," after chunk k (when it computes perplexity, i.e.
# without --no-ppl) and "image i/n: T tokens" after image i (native/patches/0002)
CHUNK_DONE = re.compile(r"\[(\d+)\][^\s,\[\]]*,")
IMAGE_DONE = re.compile(r"image (\d+)/\d+: \d+ tokens")
COMPUTING = "compute_imatrix: computing over "
Progress = Callable[[int, int], None]  # (steps done, steps in all): chunks, then images


def builtin_calibration_text() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "calibration.txt"


def compute_imatrix(model: Path | str, out: Path | str, *, text: Path | str | None = None,
                    images: Path | str | None = None, mmproj: Path | str | None = None, n_ctx: int | None = None,
                    chunks: int | None = None, threads: int | None = None, force: bool = False,
                    verbose: bool = False, progress: Progress | None = None) -> ImatrixResult:
    """An importance matrix for `model` (an unquantized LLM GGUF) from `text` (default: a built-in
    calibration text of image descriptions and conversations), computed by llama.cpp's `llama-imatrix`;
    with `images` (a directory), each image is also run through `mmproj` (default: the unquantized one
    beside the model) and the LLM with a question about it (native/patches/0002).

    The context is 512 tokens (llama.cpp's usual choice) or less when the text is short, more when an
    image needs it: the tool needs at least two contexts' worth of text tokens.

    `progress(done, total)` is called as the tool goes: 0 when it starts, then once per chunk and once
    per image, ending at `total` (chunks + images). The tool then also computes each chunk's perplexity,
    the only per-chunk line it writes; the matrix is the same bytes either way."""
    model, out = Path(model), Path(out)
    kind = classify(model)
    if kind.kind != "llm":
        raise LlavaGgufError(f"{model} is an mmproj file; an importance matrix is computed on the language model")
    if kind.quantized:
        raise LlavaGgufError(f"{model} is already quantized ({kind.type})", "compute the importance matrix on the F16 file")
    require_loadable(model, "model", header=kind.header)  # llama.cpp aborts on some defects (a block count of 0, duplicate tokens)
    text = Path(text) if text is not None else builtin_calibration_text()
    if not text.is_file():
        raise LlavaGgufError(f"calibration text {text} does not exist")
    try:
        content = text.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise LlavaGgufError(f"cannot read {text} as UTF-8 text ({e.__class__.__name__})") from None
    libs = native.configure()
    tool = libs.tools_dir / "llama-imatrix" if libs.tools_dir else None
    if tool is None or not tool.is_file():
        raise LlavaGgufError("llama-imatrix is not built", "reinstall llava-gguf (its CMake build makes the tool)")
    native.quiet_logs(verbose)
    lc = native.llama_cpp()
    info = kind.info
    ctx_train = int(info.context_length or 512)
    image_env: dict[str, str] = {}
    calibration_images: list[Path] = []
    try:
        vocab = lc.Llama(model_path=str(model), vocab_only=True, verbose=False)
    except Exception as e:  # noqa: BLE001 - llama-cpp-python raises ValueError, jinja2's errors, ...: one line
        raise LlavaGgufError(f"llama.cpp could not load {model}: {' '.join(str(e).split())[:300]}") from None
    try:
        n_tokens = len(vocab.tokenize(content.encode(), add_bos=True, special=False))
        ctx = n_ctx or min(512, ctx_train, n_tokens // 2)
        if images is not None:
            calibration_images, mm_path, prompts, need = _image_calibration(info, images, mmproj, vocab)
            if ctx < need:
                if n_ctx:
                    raise LlavaGgufError(f"--ctx {n_ctx} is too small for an image ({need} tokens with its prompt)")
                ctx = need
            image_env = {"LLAVA_GGUF_IMATRIX_MMPROJ": str(mm_path), "LLAVA_GGUF_IMATRIX_PROMPTS": "\x1e".join(prompts)}
    finally:
        vocab.close()
    if images is None and mmproj is not None:
        raise LlavaGgufError("--mmproj is used with --images", "give --images DIR too")
    if ctx < 32 or n_tokens < 2 * ctx:
        raise LlavaGgufError(f"the calibration text has {n_tokens} tokens; a context of {max(ctx, 32)} needs at least "
                             f"{2 * max(ctx, 32)}", "give a longer text with --text")
    n_chunks = n_tokens // ctx if chunks is None else min(chunks, n_tokens // ctx)
    with atomic_outputs(out.parent, [out.name], force=force) as outputs, \
            tempfile.TemporaryDirectory(prefix="llava-gguf-imatrix-") as tmp:
        partial = outputs.paths[0]  # /proc/self/fd/N: the child gets the same descriptor (pass_fds)
        if calibration_images:
            pngs = []
            for i, f in enumerate(calibration_images):
                # our loader (EXIF orientation, alpha flattened, every Pillow format) -> PNG for the tool
                png = Path(tmp) / f"{i:05d}.png"
                load_image(f).save(png)
                pngs.append(str(png))
            image_env["LLAVA_GGUF_IMATRIX_IMAGES"] = "\x1e".join(pngs)
        report = progress if not verbose else None  # --verbose: the tool's own log instead
        cmd = [str(tool), "-m", str(model), "-f", str(text), "-o", str(partial), "--output-format", "gguf",
               "-c", str(ctx), "-b", str(ctx), "--chunks", str(n_chunks), "-ngl", "0",
               *(["--no-ppl"] if report is None else []),
               "-t", str(threads or max(1, os.cpu_count() or 1)), "-ofreq", str(1 << 30)]
        returncode, log = _run_tool(cmd, {**os.environ, **image_env}, outputs.fds, verbose, report,
                                    n_chunks + len(calibration_images))
        if returncode != 0:
            device = native_write_error(partial, out)  # the tool's own message hides errno
            if device is not None:
                raise device
            tail = [ln.strip() for ln in log.splitlines() if ln.strip()]
            why = next((ln for ln in reversed(tail) if "error" in ln.lower() or "failed" in ln.lower()),
                       tail[-1] if tail else f"exit code {returncode}")
            why = why.replace(str(partial), str(out))
            raise LlavaGgufError(f"llama-imatrix failed: {why[:200]}", "--verbose shows its log")
        try:
            im = load_imatrix(partial)
        except LlavaGgufError as e:
            # llama-imatrix does not check its writes: on a full disk it exits 0 with a truncated file
            device = native_write_error(partial, out)
            if device is not None:
                raise device from None
            raise LlavaGgufError(f"llama-imatrix wrote an unreadable {out}: {e.message.replace(str(partial), str(out))}",
                                 "--verbose shows its log") from None
    return ImatrixResult(out, len(im.entries), im.chunk_count, ctx, n_tokens, im.datasets[0] if im.datasets else "",
                         len(calibration_images))


def _run_tool(cmd: list[str], env: dict[str, str], fds: tuple[int, ...], verbose: bool, progress: Progress | None,
              total: int) -> tuple[int, str]:
    """Run llama-imatrix: (exit code, its output; "" with --verbose, where it goes to the terminal).
    With `progress`, its output is read as it comes and each chunk or image done is reported, one step
    at a time (several may arrive in one read)."""
    if verbose:
        return subprocess.run(cmd, env=env, pass_fds=fds).returncode, ""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, pass_fds=fds)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    log, scanned, done = "", 0, 0
    try:
        if progress is not None:
            progress(0, total)
        while block := os.read(proc.stdout.fileno(), 1 << 16):
            log += decoder.decode(block)
            if progress is None:
                continue
            if not scanned:
                # markers count from the line that starts the chunks: the loading log before it has
                # bracketed numbers too
                scanned = log.find(COMPUTING) + 1
                if not scanned:
                    continue
            marks = sorted([*CHUNK_DONE.finditer(log, scanned), *IMAGE_DONE.finditer(log, scanned)],
                           key=lambda m: m.end())
            for m in marks:
                if done < total:
                    done += 1
                    progress(done, total)
            if marks:
                scanned = marks[-1].end()
        log += decoder.decode(b"", final=True)
        returncode = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C): the tool does not outlive the call
            proc.kill()
            proc.wait()
        proc.stdout.close()
    if returncode == 0 and progress is not None and done < total:
        progress(total, total)  # finished: whatever the log said, every step is done
    return returncode, log


def _image_calibration(info: GGUFInfo, images: Path | str, mmproj: Path | str | None, vocab):
    """(image files, mmproj, rendered prompts with the media marker, context an image needs)."""
    files = image_files(images)
    mm = Path(mmproj) if mmproj is not None else find_base_mmproj(info.path, "--mmproj")
    mm_kind = classify(mm)
    if mm_kind.kind != "mmproj":
        raise LlavaGgufError(f"--mmproj {mm} is a language model, not an mmproj file")
    require_loadable(mm, "--mmproj", header=mm_kind.header)
    mm_info = mm_kind.info
    if getattr(mm_info, "pinpoints", None):
        raise LlavaGgufError("--images is not supported for LLaVA-1.6 (anyres) models yet: llama-imatrix would "
                             "feed libmtmd's own tiling, not the rows the model was trained on",
                             "calibrate on text (leave out --images)")
    if mm_info.n_embd != info.n_embd:
        raise LlavaGgufError(f"the mmproj projects to width {mm_info.n_embd} but the language model's is {info.n_embd}",
                             "these two files are not a pair")
    special = lambda t: vocab.detokenize([t], special=True).decode(errors="replace") if t >= 0 else ""  # noqa: E731
    bos, eos = special(vocab.token_bos()), special(vocab.token_eos())
    marker = native.mtmd_cpp().mtmd_default_marker().decode()
    templates = [t for t in (info.chat_template, default_chat_template()) if t]
    prompts = [render_with_images(templates, [Message("user", q, n_images=1)], bos=bos, eos=eos)
               .replace(IMAGE_PLACEHOLDER, marker) for q in IMAGE_PROMPTS]
    longest = max(len(vocab.tokenize(p.replace(marker, "").encode(), add_bos=False, special=True)) for p in prompts)
    need = (mm_info.image_tokens or 576) + longest + 8
    return files, mm, prompts, -(-need // 64) * 64
