"""`convert`: a Hugging Face LLaVA checkpoint -> `<name>-<TYPE>.gguf` (LLM) + `mmproj-<name>-<TYPE>.gguf`,
in one pass over the checkpoint, through atomic outputs."""
from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llava_gguf.convert.checkpoint import Checkpoint, TensorRef, read_checkpoint
from llava_gguf.convert.external import attach_vision
from llava_gguf.convert.hub import CheckpointSource, is_repo_id, named_view, resolve_checkpoint
from llava_gguf.convert.llm import OUTTYPES, build_llm, type_label
from llava_gguf.convert.mmproj import MMPROJ_TYPES, build_mmproj
from llava_gguf.convert.projector import linear_as_gelu_pair
from llava_gguf.convert.writer import OutputWriteError, TensorStream
from llava_gguf.errors import LlavaGgufError
from llava_gguf.families import Family, KeyLayout, detect_layout, find_family
from llava_gguf.families.hparams import resolve_llava
from llava_gguf.gguf.outputs import atomic_outputs, write_error
from llava_gguf.quantize.job import QuantizeJob
from llava_gguf.quantize.types import QuantType, find_type

__all__ = ["ConvertResult", "LlavaSource", "open_llava", "split_parts", "stored_parts", "convert_checkpoint",
           "output_names", "OUTTYPES", "MMPROJ_TYPES", "CheckpointSource", "resolve_checkpoint", "is_repo_id",
           "check_output_types", "OutputTypes"]


@dataclass(frozen=True)
class ConvertResult:
    llm: Path
    mmproj: Path
    family: str
    layout: str
    tensors: int
    bytes_written: int


@dataclass(frozen=True)
class Progress:
    """Callbacks the CLI feeds its progress bar from; both optional."""

    start: Callable[[int, int], None] = lambda total_bytes, total_tensors: None
    advance_bytes: Callable[[int], None] = lambda n: None
    advance_tensor: Callable[[str], None] = lambda name: None
    quantize: Callable[[int, int, str], None] | None = None  # (done, total, tensor): --outtype <quant type>


def output_names(name: str, outtype: str, mmproj_type: str) -> tuple[str, str]:
    return f"{name}-{type_label(outtype)}.gguf", f"mmproj-{name}-{type_label(mmproj_type)}.gguf"


def stored_parts(source: LlavaSource) -> tuple[dict[str, TensorRef], dict[str, TensorRef], dict[str, TensorRef]]:
    """(text, vision, projector) tensors as the checkpoint stores them (the family's extra tensors, such as
    1.6's image_newline, with the projector's)."""
    text, vision, proj = _split(source.checkpoint, source.layout)
    for name, key in source.family.extra_tensors:
        if name in source.checkpoint.tensors:
            proj[key] = source.checkpoint.tensors[name]
    return text, vision, proj


def split_parts(source: LlavaSource) -> tuple[dict[str, TensorRef], dict[str, TensorRef], dict[str, TensorRef]]:
    """(text, vision, projector) tensors under the names the family's tables map (after the family's
    projector rewrite, e.g. LLaVA v1's GELU pair)."""
    text, vision, proj = stored_parts(source)
    if source.family.linear_projector:
        proj = linear_as_gelu_pair(proj)
    return text, vision, proj


def _split(ck: Checkpoint, layout: KeyLayout) -> tuple[dict[str, TensorRef], dict[str, TensorRef], dict[str, TensorRef]]:
    text: dict[str, TensorRef] = {}
    vision: dict[str, TensorRef] = {}
    proj: dict[str, TensorRef] = {}
    for name, ref in ck.tensors.items():
        # projector and tower first: a text prefix may cover them (liuhaotian's `model.mm_projector.`)
        if name.startswith(layout.projector):
            proj[name[len(layout.projector):]] = ref
        elif name.startswith(layout.vision):
            vision[name[len(layout.vision):]] = ref
        else:
            for prefix, canonical in layout.text:
                if name.startswith(prefix):
                    text[canonical + name[len(prefix):]] = ref
                    break
            # anything else (e.g. a stray image_newline of another family) is not ours to write
    return text, vision, proj


@dataclass(frozen=True)
class LlavaSource:
    """A checkpoint as the converter sees it: its family and key layout, the tower attached when it
    lives elsewhere, and hyperparameters with defaults filled in."""

    checkpoint: Checkpoint
    family: Family
    layout: KeyLayout
    root: dict
    text_hp: dict
    vision_hp: dict
    image_config_dir: Path  # where preprocessor_config.json (image mean/std) is looked for
    clip: Path | None  # the separate CLIP checkpoint used, if any


def open_llava(src: Path | str, clip: Path | str | None = None) -> LlavaSource:
    src = Path(src)
    ck = read_checkpoint(src)
    family: Family = find_family(ck.config)
    config, image_dir, clip_dir = ck.config, src, None
    if family.external_vision:
        ck, config, clip_dir = attach_vision(ck, family, Path(clip) if clip is not None else None)
        image_dir = clip_dir
    elif clip is not None:
        raise LlavaGgufError(f"--clip applies to checkpoints without a vision tower; this {family.name} checkpoint "
                             "carries its own")
    layout = detect_layout(family, list(ck.tensors))
    root, text_hp, vision_hp = resolve_llava(config)
    return LlavaSource(ck, family, layout, root, text_hp, vision_hp, image_dir, clip_dir)


@dataclass(frozen=True)
class OutputTypes:
    """--outtype / --mmproj-type checked: the LLM's written type, the mmproj's, and the llama.cpp type the
    LLM is quantized to afterwards (None: written as it is)."""

    llm: str
    mmproj: str
    quant: QuantType | None


def check_output_types(outtype: str = "f16", mmproj_type: str | None = None) -> OutputTypes:
    """The types, or the one-line error for an unknown one (before anything is read or downloaded)."""
    outtype = outtype.lower()
    quant = None
    if outtype not in OUTTYPES:
        # any llama.cpp quantization type: convert to a temporary F16 beside the outputs, quantize, remove it
        try:
            quant = find_type(outtype)
        except LlavaGgufError:
            raise LlavaGgufError(f"unknown --outtype {outtype!r}",
                                 f"choose {', '.join(OUTTYPES)} or a type of `llava-gguf quantize --list`") from None
        if quant.needs_imatrix:
            raise LlavaGgufError(f"{quant.name} needs an importance matrix",
                                 "convert to f16, run `llava-gguf imatrix`, then `llava-gguf quantize --imatrix`")
        outtype = "f16"
    mmproj_type = (mmproj_type or ("f32" if outtype == "f32" else "f16")).lower()
    if mmproj_type not in MMPROJ_TYPES:
        raise LlavaGgufError(f"unknown --mmproj-type {mmproj_type!r}", f"choose one of {', '.join(MMPROJ_TYPES)}")
    return OutputTypes(outtype, mmproj_type, quant)


def convert_checkpoint(src: Path | str | CheckpointSource, outdir: Path | str, *, outtype: str = "f16",
                       mmproj_type: str | None = None, name: str | None = None, force: bool = False,
                       progress: Progress | None = None, clip: Path | str | None = None,
                       revision: str | None = None) -> ConvertResult:
    """`src`: a checkpoint directory, or a Hugging Face repo id (`ORG/NAME`, at `revision`) fetched into the
    Hugging Face cache (or what resolve_checkpoint made of either); a local path of the same spelling
    wins. The outputs are named after `name`, by default the directory's name, NAME for a repo id."""
    outdir = Path(outdir)
    types = check_output_types(outtype, mmproj_type)
    outtype, mmproj_type, quant = types.llm, types.mmproj, types.quant
    where = resolve_checkpoint(src, revision)
    # a local directory as given (gguf-py reads the model's name from it); a snapshot as the directory NAME
    src = where.path
    src_ = open_llava(src, clip)
    family, layout = src_.family, src_.layout
    name = name or where.name
    if not re.fullmatch(r"[^/\\\x00]+", name) or name in (".", ".."):
        raise LlavaGgufError(f"--name {name!r} is not usable in a file name")
    root, text_hp, vision_hp = src_.root, src_.text_hp, src_.vision_hp
    text, vision, proj = split_parts(src_)
    # the mmproj first: its checks (feature layer, strategy, activations) need no tokenizer work
    mm = build_mmproj(family, root, vision_hp, int(text_hp["hidden_size"]), vision, proj, src_.image_config_dir,
                      mmproj_type, name)
    with named_view(src, where.name) if where.repo_id else contextlib.nullcontext(src) as named:
        # general.* as a local directory NAME holding the same files gives, not from the commit hash
        llm = build_llm(text_hp, text, named, outtype, None, family.default_chat_template)
    llm_name, mm_name = output_names(name, outtype, mmproj_type)
    if quant is not None:
        llm_name = f"{name}-{quant.name}.gguf"
    progress = progress or Progress()

    with atomic_outputs(outdir, [llm_name, mm_name], force=force) as out:
        llm_partial, mm_partial = out.paths
        # --outtype <quant type>: the F16 stage is a temporary of the same exclusive kind, removed with the rest
        stage = out.scratch("f16") if quant else llm_partial
        progress.start(llm.data_bytes + mm.data_bytes, len(llm.tensors) + len(mm.tensors))
        try:
            TensorStream([(llm, stage, outdir / llm_name), (mm, mm_partial, outdir / mm_name)]).run(
                progress.advance_bytes, progress.advance_tensor)
        except OutputWriteError as e:
            raise write_error(e.error, e.target) from None
        except OSError as e:  # reading the checkpoint
            raise LlavaGgufError(f"reading {src} failed: {e.strerror or e}") from None
        except EOFError:
            raise LlavaGgufError("a weight file ended early while it was being read",
                                 "the checkpoint changed or is truncated; download it again") from None
        if quant is not None:
            try:
                job = QuantizeJob.plan(stage, quant, allow_requantize=False, imatrix=None)
            except LlavaGgufError as e:  # about the F16 stage: name the output, not /proc/self/fd/N
                raise LlavaGgufError(e.message.replace(str(stage), f"the F16 stage of {outdir / llm_name}"),
                                     e.hint) from None
            job.run(llm_partial, threads=None, leave_output_tensor=False, verbose=False, progress=progress.quantize,
                    target=outdir / llm_name, on_abandon=out.park)
    return ConvertResult(outdir / llm_name, outdir / mm_name, family.name, layout.name,
                         len(llm.tensors) + len(mm.tensors), llm.data_bytes + mm.data_bytes)
