"""Importance matrices: reading them the way llama-quantize does (so our quantized files are the same
bytes as its), and computing them with llama.cpp's `llama-imatrix` tool, built by our CMake.

Reading follows common/imatrix-loader.cpp and tools/quantize/quantize.cpp (`load_imatrix`) at the pinned
commit: a GGUF imatrix holds `<tensor>.in_sum2` and `<tensor>.counts` (F32) plus `imatrix.datasets`,
`imatrix.chunk_count`, `imatrix.chunk_size`; the legacy `.dat` format is n_entries, then per entry
(name, ncall, nval, values), then optionally the chunk count and the dataset name. Values are
normalised to mean squared activations per column (per expert), as llama-quantize hands them on."""
from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LlavaGgufError

KV_FILE = "quantize.imatrix.file"
KV_DATASET = "quantize.imatrix.dataset"
KV_N_ENTRIES = "quantize.imatrix.entries_count"
KV_N_CHUNKS = "quantize.imatrix.chunks_count"


@dataclass
class Imatrix:
    path: str  # as the user gave it: it is recorded in the quantized file's metadata
    entries: dict[str, np.ndarray]  # tensor name -> float32 values, normalised
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0


def load_imatrix(path: str | Path) -> Imatrix:
    p = Path(path)
    if not p.is_file():
        raise LlavaGgufError(f"importance matrix {path} does not exist", "compute one with `llava-gguf imatrix`")
    with p.open("rb") as f:
        magic = f.read(4)
    try:
        im = _load_gguf(p) if magic == b"GGUF" else _load_legacy(p)
    except (ValueError, struct.error, OSError, IndexError, KeyError) as e:
        raise LlavaGgufError(f"{path} is not a readable importance matrix ({str(e)[:160]})",
                             "compute one with `llava-gguf imatrix`") from None
    im.path = str(path)
    if not im.entries:
        raise LlavaGgufError(f"{path} holds no importance-matrix entries", "compute one with `llava-gguf imatrix`")
    return im


def _load_gguf(p: Path) -> Imatrix:
    import gguf

    r = gguf.GGUFReader(p)
    keys = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
    if any(k not in r.fields for k in keys):
        arch = r.fields.get("general.architecture")
        what = f"a {arch.contents()} model" if arch is not None else "not an importance matrix"
        raise ValueError(f"it is {what}: no imatrix.* metadata")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        for suffix, into in ((".in_sum2", sums), (".counts", counts)):
            if t.name.endswith(suffix):
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise ValueError(f"{t.name} is not F32")
                into[t.name[: -len(suffix)]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    if set(sums) != set(counts):
        raise ValueError(f"mismatched sums and counts for {sorted(set(sums) ^ set(counts))[0]}")
    entries = {}
    for name, s in sums.items():
        if counts[name].size == 0 or s.size % counts[name].size:
            raise ValueError(f"{name}: {s.size} sums do not split into {counts[name].size} counts")
        raw = counts[name].astype(np.float64)
        c = (np.floor(np.abs(raw) + 0.5) * np.sign(raw)).astype(np.float32)  # std::lround, then (float)
        ne0 = s.size // c.size
        e = np.ones_like(s)
        for j, cnt in enumerate(c):
            if cnt > 0:
                e[j * ne0:(j + 1) * ne0] = s[j * ne0:(j + 1) * ne0] / cnt
        entries[name] = e
    raw = r.fields["imatrix.datasets"].contents()
    datasets = [str(x) for x in raw] if isinstance(raw, list) else []  # llama.cpp reads a string array only
    return Imatrix("", entries, datasets, int(r.fields["imatrix.chunk_count"].contents()))


def _load_legacy(p: Path) -> Imatrix:
    data = p.read_bytes()
    off = 0

    def take(fmt: str):
        nonlocal off
        vals = struct.unpack_from(fmt, data, off)
        off += struct.calcsize(fmt)
        return vals

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise ValueError("no data")
    entries: dict[str, np.ndarray] = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if length < 0 or off + length > len(data):
            raise ValueError("truncated entry name")
        name = data[off:off + length].split(b"\0", 1)[0].decode(errors="replace")
        off += length
        ncall, nval = take("<ii")
        if nval < 1 or off + 4 * nval > len(data):
            raise ValueError("truncated entry")
        sums = np.frombuffer(data, dtype="<f4", count=nval, offset=off).astype(np.float32)
        off += 4 * nval
        entries[name] = sums / np.float32(ncall) if ncall > 0 else sums.copy()
    chunk_count, datasets = 0, []
    if off + 4 <= len(data):  # optional trailer: chunk count, dataset name (raw bytes up to a NUL)
        (chunk_count,) = take("<i")
        if off + 4 <= len(data):
            (length,) = take("<i")
            if 0 < length and off + length <= len(data):
                datasets.append(data[off:off + length].split(b"\0", 1)[0].decode(errors="replace"))
    return Imatrix("", entries, datasets, chunk_count)


class NativeImatrix:
    """The C arrays `llama_model_quantize_params.imatrix` and `.kv_overrides` point at, built exactly as
    llama-quantize builds them (same keys, same order), and kept alive while the quantizer runs."""

    def __init__(self, lc, im: Imatrix) -> None:
        n = len(im.entries)
        self._names = [name.encode() for name in im.entries]
        self._values = [np.ascontiguousarray(v, dtype=np.float32) for v in im.entries.values()]
        self.data = (lc.llama_model_imatrix_data * (n + 1))()
        for i, (name, v) in enumerate(zip(self._names, self._values)):
            self.data[i].name = name
            self.data[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            self.data[i].size = v.size
        overrides: list[tuple[str, str | int]] = [(KV_FILE, im.path)]
        if im.datasets:
            overrides.append((KV_DATASET, im.datasets[0]))
        overrides.append((KV_N_ENTRIES, n))
        if im.chunk_count > 0:
            overrides.append((KV_N_CHUNKS, im.chunk_count))
        self.kv = (lc.llama_model_kv_override * (len(overrides) + 1))()
        for i, (key, value) in enumerate(overrides):
            self.kv[i].key = key.encode()
            if isinstance(value, str):
                self.kv[i].tag = lc.LLAMA_KV_OVERRIDE_TYPE_STR
                self.kv[i].value.val_str = os.fsencode(value)[:127]
            else:
                self.kv[i].tag = lc.LLAMA_KV_OVERRIDE_TYPE_INT
                self.kv[i].value.val_i64 = value


@dataclass(frozen=True)
class ImatrixResult:
    output: Path
    entries: int
    chunks: int
    n_ctx: int
    tokens: int
    dataset: str
    images: int = 0


def builtin_calibration_text() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "calibration.txt"


def compute_imatrix(model: Path | str, out: Path | str, *, text: Path | str | None = None,
                    images: Path | str | None = None, mmproj: Path | str | None = None, n_ctx: int | None = None,
                    chunks: int | None = None, threads: int | None = None, force: bool = False,
                    verbose: bool = False) -> ImatrixResult:
    """An importance matrix for `model` (an unquantized LLM GGUF) from `text` (default: a built-in
    calibration text of image descriptions and conversations), computed by llama.cpp's `llama-imatrix`;
    with `images` (a directory), each image is also run through `mmproj` (default: the unquantized one
    beside the model) and the LLM with a question about it (native/patches/0002).

    The context is 512 tokens (llama.cpp's usual choice) or less when the text is short, more when an
    image needs it: the tool needs at least two contexts' worth of text tokens."""
    import os
    import subprocess
    import tempfile

    from ..gguf_checks import require_loadable
    from ..outputs import atomic_outputs, native_write_error
    from ..runtime import native
    from . import classify

    model, out = Path(model), Path(out)
    kind = classify(model)
    if kind.kind != "llm":
        raise LlavaGgufError(f"{model} is an mmproj file; an importance matrix is computed on the language model")
    if kind.quantized:
        raise LlavaGgufError(f"{model} is already quantized ({kind.type})", "compute the importance matrix on the F16 file")
    require_loadable(model, "model", walked=(kind.layout, kind.reader))  # llama.cpp aborts on some defects (a block count of 0, duplicate tokens)
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
    image_files: list[Path] = []
    try:
        vocab = lc.Llama(model_path=str(model), vocab_only=True, verbose=False)
    except Exception as e:  # noqa: BLE001 - llama-cpp-python raises ValueError, jinja2's errors, ...: one line
        raise LlavaGgufError(f"llama.cpp could not load {model}: {' '.join(str(e).split())[:300]}") from None
    try:
        n_tokens = len(vocab.tokenize(content.encode(), add_bos=True, special=False))
        ctx = n_ctx or min(512, ctx_train, n_tokens // 2)
        if images is not None:
            image_files, mm_path, prompts, need = _image_calibration(info, images, mmproj, vocab)
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
        if image_files:
            from ..runtime.images import load_image

            pngs = []
            for i, f in enumerate(image_files):
                # our loader (EXIF orientation, alpha flattened, every Pillow format) -> PNG for the tool
                png = Path(tmp) / f"{i:05d}.png"
                load_image(f).save(png)
                pngs.append(str(png))
            image_env["LLAVA_GGUF_IMATRIX_IMAGES"] = "\x1e".join(pngs)
        cmd = [str(tool), "-m", str(model), "-f", str(text), "-o", str(partial), "--output-format", "gguf",
               "-c", str(ctx), "-b", str(ctx), "--chunks", str(n_chunks), "-ngl", "0", "--no-ppl",
               "-t", str(threads or max(1, os.cpu_count() or 1)), "-ofreq", str(1 << 30)]
        p = subprocess.run(cmd, stdout=None if verbose else subprocess.PIPE, stderr=None if verbose else subprocess.STDOUT,
                           text=True, errors="replace", env={**os.environ, **image_env}, pass_fds=outputs.fds)
        if p.returncode != 0:
            device = native_write_error(partial, out)  # the tool's own message hides errno
            if device is not None:
                raise device
            tail = [ln.strip() for ln in (p.stdout or "").splitlines() if ln.strip()]
            why = next((ln for ln in reversed(tail) if "error" in ln.lower() or "failed" in ln.lower()),
                       tail[-1] if tail else f"exit code {p.returncode}")
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
                         len(image_files))


def _image_calibration(info, images: Path | str, mmproj: Path | str | None, vocab):
    """(image files, mmproj, rendered prompts with the media marker, context an image needs)."""
    from ..convert.families.llava15 import FAMILY
    from ..gguf_checks import require_loadable
    from ..quality import DEFAULT_PROMPTS, find_base_mmproj
    from ..runtime import native
    from ..runtime.images import image_files
    from ..runtime.prompt import IMAGE_PLACEHOLDER, Message, render_with_images
    from . import classify

    files = image_files(images)
    mm = Path(mmproj) if mmproj is not None else find_base_mmproj(info.path, "--mmproj")
    mm_kind = classify(mm)
    if mm_kind.kind != "mmproj":
        raise LlavaGgufError(f"--mmproj {mm} is a language model, not an mmproj file")
    require_loadable(mm, "--mmproj", walked=(mm_kind.layout, mm_kind.reader))
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
    templates = [t for t in (info.chat_template, FAMILY.default_chat_template) if t]
    prompts = [render_with_images(templates, [Message("user", q, n_images=1)], bos=bos, eos=eos)
               .replace(IMAGE_PLACEHOLDER, marker) for q in DEFAULT_PROMPTS]
    longest = max(len(vocab.tokenize(p.replace(marker, "").encode(), add_bos=False, special=True)) for p in prompts)
    need = (mm_info.image_tokens or 576) + longest + 8
    return files, mm, prompts, -(-need // 64) * 64
