"""`quantize`: llama.cpp's quantizer, in process through llama-cpp-python's `llama_model_quantize` binding
on our own libraries (the same code `llama-quantize` runs, so the output is the same bytes), with our
atomic-output rules and file naming."""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LlavaGgufError, warn
from ..outputs import atomic_outputs, native_write_error, write_error

if TYPE_CHECKING:
    from ..runtime.model import GGUFInfo


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
        name = _ALIASES.get(self.name, self.name)
        note = next(t.note for t in QUANT_TYPES if t.name == name)
        m = re.match(r"([\d.]+)G, .* @ Llama-3-8B", note)
        if m:
            return float(m.group(1)) * 2**30 * 8 / 8.03e9
        m = re.match(r"([\d.]+) bpw", note)
        return float(m.group(1)) if m else {"F16": 16.0, "BF16": 16.0, "F32": 32.0, "MXFP4_MOE": 8.5}[name]


_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


# llama-quantize's QUANT_OPTIONS at the pinned commit (tools/quantize/quantize.cpp), in its order;
# needs_imatrix where src/llama-quant.cpp refuses to run without one.
QUANT_TYPES: tuple[QuantType, ...] = (
    QuantType("Q1_0", 40, "1.125 bpw quantization"),
    QuantType("Q2_0", 41, "2.25 bpw quantization (group 64)"),
    QuantType("Q4_0", 2, "4.34G, +0.4685 ppl @ Llama-3-8B"),
    QuantType("Q4_1", 3, "4.78G, +0.4511 ppl @ Llama-3-8B"),
    QuantType("MXFP4_MOE", 38, "MXFP4 for mixture-of-experts tensors (LLaVA has none: Q8_0 elsewhere)"),
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
MAX_BUF_SIZE = 256 * 2**20
_FLOAT_GGML_TYPES = {0: "F32", 1: "F16", 30: "BF16"}

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
    source: Path | None = None  # None when the output is a copy of a kept file


@dataclass(frozen=True)
class GGUFKind:
    path: Path
    kind: str  # "llm" | "mmproj"
    arch: str
    type: str  # the file's type in llama.cpp's spelling, e.g. F16, Q8_0 ("?" when not recorded)
    quantized: bool
    info: GGUFInfo  # width, template, image tokens: what the runtime reads
    # the file as walked (gguf_layout) and its key-value section (gguf-py): what the load checks read again
    layout: object = field(default=None, repr=False, compare=False)
    reader: object = field(default=None, repr=False, compare=False)


def classify(path: Path | str) -> GGUFKind:
    """What a GGUF file is, for quantizing: a LLaVA language model or an mmproj; anything else is refused."""
    from ..gguf_checks import field_value
    from ..gguf_layout import check_loadable
    from ..runtime.model import read_gguf_info

    path = Path(path)
    if not path.exists():
        raise LlavaGgufError(f"source {path} does not exist")
    # walked as gguf.cpp reads it (one-line errors for a cut or corrupt file); only the key-value section
    # goes through gguf-py: the tensors' types and shapes are the walk's
    layout, r = check_loadable(path, kv=True)
    info = read_gguf_info(path, "source", reader=r)

    def value(key: str):  # a string that is not UTF-8 is decoded with replacement (gguf-py would raise)
        return field_value(r, key)

    arch = value("general.architecture") or "?"
    if (value("split.count") or 1) > 1:
        raise LlavaGgufError(f"{path} is one shard of a split GGUF",
                             "merge it first (llama.cpp's gguf-split --merge), then quantize the single file")
    matrix_types = {t.type_id for t in layout.tensors if len([d for d in t.ne if d > 1]) >= 2}
    quantized = any(t not in _FLOAT_GGML_TYPES for t in matrix_types)
    ftype = value("general.file_type")
    names = {t.ftype: t.name for t in QUANT_TYPES if t.name not in _ALIASES}
    type_name = names.get(int(ftype), "?") if ftype is not None else (
        _FLOAT_GGML_TYPES.get(next(iter(matrix_types)), "?") if len(matrix_types) == 1 else "?")
    if arch == "clip":
        if not value("clip.has_vision_encoder") or value("clip.projector_type") is None and not value("clip.has_llava_projector"):
            raise LlavaGgufError(f"{path} is a CLIP file without a vision encoder and projector, not an mmproj")
        return GGUFKind(path, "mmproj", arch, type_name, quantized, info, layout, r)
    if (value("general.type") or "model") != "model" or value("tokenizer.ggml.model") is None \
            or value(f"{arch}.block_count") is None or value(f"{arch}.embedding_length") is None:
        what = value("general.type") or ("an importance matrix" if "imatrix.datasets" in r.fields else arch)
        raise LlavaGgufError(f"{path} is neither a LLaVA language model nor an mmproj ({what})",
                             "give the LLM or mmproj .gguf that `llava-gguf convert` wrote")
    return GGUFKind(path, "llm", arch, type_name, quantized, info, layout, r)


Progress = Callable[[int, int, str], None]  # (tensors done, tensors in all, current tensor name)


def quantize_gguf(src: Path | str, type_name: str, out: Path | str | None = None, *, threads: int | None = None,
                  allow_requantize: bool = False, leave_output_tensor: bool = False, imatrix: str | Path | None = None,
                  force: bool = False, verbose: bool = False, progress: Progress | None = None) -> QuantizeResult:
    """Quantize a language-model or mmproj GGUF to `type_name`; the output appears atomically."""
    src = Path(src)
    qtype = find_type(type_name)
    job = _Job.plan(src, qtype, allow_requantize=allow_requantize, imatrix=imatrix)
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


MMPROJ_CHOICES = ("keep",) + tuple(t.lower() for t in MMPROJ_QUANT_TYPES)


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
    llm, mmproj = _directory_sources(src)
    job = _Job.plan(llm.path, qtype, allow_requantize=allow_requantize, imatrix=imatrix)
    mm_job = None
    mm_dest = outdir / mmproj.path.name
    if mm_choice != "keep" and find_type(mm_choice).name != mmproj.type:
        mm_qtype = find_type(mm_choice)
        mm_job = _Job.plan(mmproj.path, mm_qtype, allow_requantize=allow_requantize, imatrix=None)
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


def _directory_sources(src: Path) -> tuple[GGUFKind, GGUFKind]:
    if not src.is_dir():
        raise LlavaGgufError(f"{src} does not exist", "give a .gguf file or the directory `llava-gguf convert` wrote")
    kinds = []
    for p in sorted(src.glob("*.gguf")):
        try:
            kinds.append(classify(p))
        except LlavaGgufError:
            continue  # an imatrix or anything else beside the pair is not ours to quantize
    llms = [k for k in kinds if k.kind == "llm" and not k.quantized]
    mmprojs = [k for k in kinds if k.kind == "mmproj"]
    if not llms:
        quantized = [k.path.name for k in kinds if k.kind == "llm"]
        raise LlavaGgufError(f"no unquantized language model in {src}" + (f" (only {', '.join(quantized)})" if quantized else ""),
                             "run `llava-gguf convert` first, or give the .gguf file itself")
    if len(llms) > 1:
        raise LlavaGgufError(f"several unquantized language models in {src}: {', '.join(k.path.name for k in llms)}",
                             "give the .gguf file to quantize instead of the directory")
    llm = llms[0]
    stem = _TYPE_SUFFIX.sub("", llm.path.stem)
    width = llm.info.n_embd
    pairs = [k for k in mmprojs if k.info.n_embd == width]
    if not pairs:
        raise LlavaGgufError(f"no mmproj in {src} matches {llm.path.name} (embedding width {width})",
                             "run `llava-gguf convert` first")
    named = [k for k in pairs if _TYPE_SUFFIX.sub("", k.path.stem) == f"mmproj-{stem}"]
    candidates = named or pairs
    candidates.sort(key=lambda k: (k.quantized, {"F32": 0, "F16": 1, "BF16": 2}.get(k.type, 3), k.path.name))
    if not named and len({_TYPE_SUFFIX.sub("", k.path.stem) for k in candidates}) > 1:
        raise LlavaGgufError(f"several mmproj files in {src} could go with {llm.path.name}: "
                             f"{', '.join(k.path.name for k in candidates)}", "quantize the files one by one")
    return llm, candidates[0]



@dataclass
class _Job:
    src: GGUFKind
    qtype: QuantType
    allow_requantize: bool
    imatrix: object | None  # imatrix.Imatrix

    @classmethod
    def plan(cls, src: Path, qtype: QuantType, *, allow_requantize: bool, imatrix: str | Path | None) -> _Job:
        """Every check that can fail, before any output exists."""
        from ..gguf_checks import require_loadable

        kind = classify(src)
        # llama.cpp's quantizer loads the source as the runtime does (an invalid hparam aborts the process,
        # a bad vocabulary would be copied on): what would stop llama.cpp is refused here, with one line
        reader = require_loadable(src, "source", walked=(kind.layout, kind.reader))
        if kind.kind == "llm":  # llama.cpp does not read the template; our chat refuses it: say so now
            from ..gguf_checks import chat_template_defects

            for d in chat_template_defects(reader):
                warn(f"{src}: {d.message}", "the quantized model keeps it; convert the checkpoint again")
        if kind.kind == "mmproj":
            if qtype.name not in MMPROJ_QUANT_TYPES:
                raise LlavaGgufError(f"{src} is an mmproj file, which is quantized to {', '.join(MMPROJ_QUANT_TYPES)} only",
                                     "libmtmd is not shown to load and run it in other types")
            if imatrix is not None:
                raise LlavaGgufError("an importance matrix applies to the language model, not to an mmproj file")
        if qtype.needs_imatrix and imatrix is None:
            raise LlavaGgufError(f"{qtype.name} needs an importance matrix",
                                 f"compute one with `llava-gguf imatrix {src.name} -o imatrix.gguf`, then pass --imatrix imatrix.gguf")
        if kind.quantized and not allow_requantize:
            raise LlavaGgufError(f"{src} is already quantized ({kind.type})",
                                 "quantize the F16/F32 file instead, or pass --allow-requantize (it costs quality)")
        loaded = None
        if imatrix is not None:
            from .imatrix import load_imatrix

            loaded = load_imatrix(imatrix)
        return cls(kind, qtype, allow_requantize, loaded)

    def run(self, dest: Path, *, threads: int | None, leave_output_tensor: bool, verbose: bool,
            progress: Progress | None, target: Path, on_abandon: Callable[[], None] | None = None) -> None:
        """Quantize into `dest` (the OutputSet's path for a temporary); `target` is the final name,
        which messages name."""
        from ..runtime import native

        native.configure()
        lc = native.llama_cpp()
        params = lc.llama_model_quantize_default_params()
        params.nthread = threads or 0
        params.ftype = self.qtype.ftype
        params.allow_requantize = self.allow_requantize
        params.quantize_output_tensor = not leave_output_tensor
        # Rows of one tensor held in memory at once. llama-quantize's default (8 GiB) converts a whole
        # token_embd to f32 (525 MB at 7B); slabs of 256 MiB give the same bytes with less memory.
        params.max_buf_size = MAX_BUF_SIZE
        keep_alive = None
        if self.imatrix is not None:
            from .imatrix import NativeImatrix

            keep_alive = NativeImatrix(lc, self.imatrix)
            params.imatrix = ctypes.cast(keep_alive.data, type(params.imatrix))
            params.kv_overrides = ctypes.cast(keep_alive.kv, type(params.kv_overrides))
        src_b, dest_b = os.fsencode(self.src.path), os.fsencode(dest)
        rc, last_error = _call_native(lambda: lc.llama_model_quantize(src_b, dest_b, ctypes.byref(params)),
                                      dest, verbose=verbose, progress=progress, on_abandon=on_abandon)
        del keep_alive
        if rc != 0:
            # llama.cpp's ofstream turns ENOSPC into "basic_ios::clear: iostream error": ask the device
            device = native_write_error(dest, target)
            if device is not None:
                raise device
            last_error = last_error.replace(os.fsdecode(dest_b), str(target))
            why = f": {last_error}" if last_error else ""
            raise LlavaGgufError(f"llama.cpp could not quantize {self.src.path.name} to {self.qtype.name}{why}"[:400],
                                 "--verbose shows llama.cpp's log")


_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
# ctypes callbacks handed to llama.cpp stay alive for the life of the process: a worker abandoned on
# Ctrl-C may still log through its callback after we return.
_log_callbacks: list = []
_GGML_LOG_LEVEL_ERROR = 4  # ggml.h: enum ggml_log_level
_abandoned: list[threading.Thread] = []


def _call_native(fn: Callable[[], int], dest: Path, *, verbose: bool, progress: Progress | None,
                 on_abandon: Callable[[], None] | None = None) -> tuple[int, str]:
    """Run llama_model_quantize in a worker thread, feeding `progress` from llama.cpp's per-tensor log
    lines; returns (return code, last error line llama.cpp logged).

    llama.cpp cannot be stopped half-way, so on Ctrl-C (or SIGTERM) this waits until the output file is
    open (the first tensor line: a fraction of a second), then lets the caller remove it at once; the
    worker's writes go to the unlinked file, and if it ever finishes it removes the file it wrote (only
    that one). The CLI exits right after, which ends the worker too."""
    import sys

    from ..runtime import native

    if any(t.is_alive() for t in _abandoned):
        raise LlavaGgufError("a quantization interrupted earlier is still finishing in the background",
                             "wait for it, or start a new process")
    lc = native.llama_cpp()
    opened = threading.Event()
    done = threading.Event()
    cancelled = threading.Event()
    state: dict = {"rc": 1, "total": 0, "error": "", "ino": None}

    @lc.llama_log_callback
    def on_log(level, text, user_data):  # noqa: ANN001
        s = text.decode(errors="replace") if text else ""
        m = _TENSOR_LINE.match(s)
        if m:
            if not opened.is_set():
                try:
                    state["ino"] = dest.stat().st_ino
                except OSError:
                    pass
                opened.set()
            state["total"] = int(m.group(2))
            if progress is not None and not cancelled.is_set():
                progress(int(m.group(1)) - 1, state["total"], m.group(3))
        elif level == _GGML_LOG_LEVEL_ERROR and s.strip():
            state["error"] = " ".join(s.split())
        if verbose:
            sys.stderr.write(s)
            sys.stderr.flush()

    _log_callbacks.append(on_log)
    lc.llama_log_set(on_log, None)

    def work() -> None:
        try:
            state["rc"] = fn()
        finally:
            done.set()
            if cancelled.is_set():
                try:
                    if state["ino"] is None or dest.stat().st_ino == state["ino"]:
                        dest.unlink()
                except OSError:
                    pass

    worker = threading.Thread(target=work, name="llama_model_quantize", daemon=True)
    worker.start()
    try:
        while not done.wait(0.1):
            pass
    except BaseException:
        cancelled.set()
        _abandoned.append(worker)
        if on_abandon is not None:
            on_abandon()  # the worker may still open `dest` (/proc/self/fd/N): keep N from being reused
        deadline = 30.0
        while deadline > 0 and not (opened.is_set() or done.is_set()):
            try:
                opened.wait(0.1)
            except KeyboardInterrupt:
                pass  # a second Ctrl-C: still wait (briefly) until removing the partial is final
            deadline -= 0.1
        raise
    finally:
        if done.is_set():
            if verbose:
                lc.llama_log_set(None, None)  # llama.cpp's own stderr logging again
            else:
                native.quiet_logs(verbose)
    if state["rc"] == 0 and progress is not None and state["total"]:
        progress(state["total"], state["total"], "")
    return state["rc"], state["error"]
