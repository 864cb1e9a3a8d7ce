"""`verify`: the parity check of our tests, for users. The Hugging Face checkpoint in transformers and the
converted (or quantized) GGUF pair in our runtime see the same images and the same token ids; reported:
image-embedding cosine, next-token KL divergence and top-1 agreement along transformers' greedy answer,
and whether the greedy answers are identical.

Both sides get the same pixels: an image is first made square the way LLaVA-1.5 was trained (padded
with the CLIP mean colour, as libmtmd does) and resized with PIL to the tower's resolution, so neither
side resizes again (libmtmd's resizer and PIL's differ, and llava-hf's processor would centre-crop).
The reference (checks/reference.py) is built from the same `open_llava` view of the checkpoint the
converter reads, so every family and layout it converts is checked, including the original layout with
its separate CLIP tower and LLaVA v1's linear projector. torch and transformers are imported inside
`verify`: they take seconds to import, and `llava-gguf --help` must not pay for them."""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llava_gguf.checks.metrics import kl_divergence, log_softmax, same_top1, token_cosines
from llava_gguf.checks.reference import (build_reference, image_features, image_path_float32, pinpoints_conflict,
                                         square_image)
from llava_gguf.checks.samples import sample_image
from llava_gguf.convert import open_llava, resolve_checkpoint
from llava_gguf.convert.mmproj import image_norm
from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.classify import is_quantized
from llava_gguf.gguf.info import read_gguf_info
from llava_gguf.gguf.pairing import locate_pair
from llava_gguf.native.library import ENV_MTMD_VARIANT
from llava_gguf.runtime.images import load_image
from llava_gguf.runtime.resources import available_memory
from llava_gguf.runtime.model import LLaVA

PROMPT = "What is in the image?"


@dataclass(frozen=True)
class VerifyReport:
    """What `verify` measured and whether it passed (rendered by cli/render.py; `to_json()` is --json)."""

    source: str
    llm: str
    mmproj: str
    runtime: str  # "fixed" (our libmtmd) or "stock"
    reference_dtype: str  # "float32", or "bfloat16 language model" (vision tower and projector stay float32)
    images: list[str]
    tokens: int
    cosine_mean: float = 0.0
    cosine_min: float = 0.0
    kl_mean: float = 0.0
    kl_max: float = 0.0
    top1: float = 0.0
    greedy_identical: int = 0
    thresholds: dict = field(default_factory=dict)
    # LLaVA-NeXT: {"config.json": [...], "preprocessor_config.json": [...]} when the two grids differ
    # (the reference follows config.json, as the model and the mmproj do); None otherwise
    grid_pinpoints_conflict: dict | None = None
    passed: bool = False
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """The --json form: every field, as named here."""
        return asdict(self)

    to_dict = to_json  # the name of the API before reports had one shape


def sample_images(size: int, n: int = 3) -> list:
    return [sample_image(size, seed=s) for s in range(n)]


def verify(src: Path | str, outdir: Path | str, *, images: Path | str | None = None, clip: Path | str | None = None,
           llm: Path | str | None = None, mmproj: Path | str | None = None, tokens: int = 16,
           runtime: str = "fixed", min_cosine: float | None = None, min_top1: float | None = None,
           threads: int | None = None, reference_dtype: str = "auto", revision: str | None = None) -> VerifyReport:
    """`src`: the checkpoint directory, or its Hugging Face repo id (ORG/NAME at `revision`, fetched as convert
    fetches it). `reference_dtype`: "auto" (float32 when the model and the GGUF pair fit in available memory,
    else the language model in bfloat16 — the vision tower and projector always run in float32, so the
    image check is exact either way), "float32" or "bfloat16"."""
    if runtime not in ("fixed", "stock"):
        raise LlavaGgufError(f"--runtime {runtime!r}: choose fixed or stock")
    if reference_dtype not in ("auto", "float32", "bfloat16"):
        raise LlavaGgufError(f"--reference-dtype {reference_dtype!r}: choose auto, float32 or bfloat16")
    if "llama_cpp" in sys.modules and os.environ.get(ENV_MTMD_VARIANT, "fixed") != runtime:
        raise LlavaGgufError(f"this process already loaded the {os.environ.get(ENV_MTMD_VARIANT, 'fixed')} libmtmd",
                             f"run --runtime {runtime} in a new process")
    os.environ[ENV_MTMD_VARIANT] = runtime  # read when the native libraries load, below
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes are not ours
    import torch  # heavy: see the module docstring
    from transformers import AutoTokenizer  # heavy
    from transformers.utils import logging as hf_logging  # heavy

    source = open_llava(resolve_checkpoint(src, revision).path, clip)
    llm_path, mm_path = locate_pair(Path(outdir), llm, mmproj)
    size = int(source.vision_hp["image_size"])
    pics, names = _pictures(images, source.family.anyres, size)
    info = read_gguf_info(mm_path, "mmproj")
    if info.image_size is not None and info.image_size != size:
        raise LlavaGgufError(f"the mmproj takes {info.image_size} px images, the checkpoint {size} px",
                             "is OUTDIR converted from SRC?")
    hf_logging.disable_progress_bar()
    params = source.checkpoint.total_bytes // 2  # ~parameters (f16/bf16 checkpoints)
    gguf_bytes = llm_path.stat().st_size + mm_path.stat().st_size  # loaded at the same time
    fp32_fits = params * 4 * 1.3 + gguf_bytes < (available_memory() or 1 << 62)
    if reference_dtype == "auto":
        reference_dtype = "float32" if fp32_fits else "bfloat16"
    dtype = torch.float32 if reference_dtype == "float32" else torch.bfloat16
    model = build_reference(source, dtype)
    if dtype != torch.float32:  # the image path in full precision: the tower and projector are small
        image_path_float32(model, source)
    tok = AutoTokenizer.from_pretrained(str(source.checkpoint.path))
    before = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok.encode("USER: ", add_special_tokens=False)
    after = tok.encode(f"\n{PROMPT} ASSISTANT:", add_special_tokens=False)

    quantized_llm, quantized_mm = is_quantized(llm_path), is_quantized(mm_path)
    thresholds = {"cosine": min_cosine if min_cosine is not None else (0.99 if quantized_mm else 0.999),
                  "top1": min_top1 if min_top1 is not None else (0.80 if quantized_llm else 0.95)}
    proc, conflict = _processor(source, size)
    cosines, kls, top1, same = [], [], [], 0

    def reference_rows(img):
        """(rows, model inputs for the image) from transformers."""
        inp = proc(images=img, return_tensors="pt")
        pixels = inp["pixel_values"].float()
        if not source.family.anyres:
            return image_features(model, pixels), {"pixel_values": pixels}
        with torch.no_grad():
            out = model.model.get_image_features(pixel_values=pixels, image_sizes=inp["image_sizes"])
        rows = out.pooler_output if torch.is_tensor(out.pooler_output) else out.pooler_output[0]
        return rows.float().numpy(), {"pixel_values": pixels, "image_sizes": inp["image_sizes"]}
    with LLaVA(llm_path, mm_path, n_threads=threads) as m:
        for img in pics:
            ref, image_inputs = reference_rows(img)
            emb = m.embed_image(img)
            if emb.shape != ref.shape:
                raise LlavaGgufError(f"the GGUF pair gives {emb.shape[0]} image rows of {emb.shape[1]}, transformers "
                                     f"{ref.shape[0]} of {ref.shape[1]}", "is OUTDIR converted from SRC?")
            cosines.append(token_cosines(emb, ref))
            # transformers' greedy answer, then its logits along it (teacher-forced)
            ids = before + [model.config.image_token_id] * ref.shape[0] + after
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids]), **image_inputs, use_cache=True)
                greedy, logits_hf = [], [out.logits[0, -1].float().numpy()]
                for _ in range(tokens):
                    nxt = int(np.argmax(logits_hf[-1]))
                    greedy.append(nxt)
                    if nxt == tok.eos_token_id or len(greedy) == tokens:
                        break
                    out = model(input_ids=torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
                    logits_hf.append(out.logits[0, -1].float().numpy())
            m.reset()
            m.eval_tokens(before)
            m.eval_image(img)
            m.eval_tokens(after)
            ours = [m.last_logits().astype(np.float64)]
            for t in greedy[:-1]:
                m.eval_tokens([t])
                ours.append(m.last_logits().astype(np.float64))
            for p_logits, q_logits in zip(logits_hf, ours):
                n = min(len(p_logits), len(q_logits))
                lp, lq = log_softmax(p_logits[:n]), log_softmax(q_logits[:n])
                kls.append(kl_divergence(lp, lq))
                top1.append(same_top1(lp, lq))
            same += _greedy_answer(m, before, img, after, len(greedy)) == greedy
    allc = np.concatenate(cosines)
    cosine_mean, top1_rate = float(allc.mean()), float(np.mean(top1))
    failures = []
    if cosine_mean < thresholds["cosine"]:
        failures.append(f"image-embedding cosine {cosine_mean:.6f} < {thresholds['cosine']}")
    if top1_rate < thresholds["top1"]:
        failures.append(f"top-1 agreement {top1_rate:.3f} < {thresholds['top1']}")
    return VerifyReport(str(src), str(llm_path), str(mm_path), runtime,
                        "float32" if dtype == torch.float32 else "bfloat16 language model", names, tokens,
                        cosine_mean=cosine_mean, cosine_min=float(allc.min()), kl_mean=float(np.mean(kls)),
                        kl_max=float(np.max(kls)), top1=top1_rate, greedy_identical=same, thresholds=thresholds,
                        grid_pinpoints_conflict=conflict, passed=not failures, failures=failures)


def _pictures(images: Path | str | None, anyres: bool, size: int) -> tuple[list, list[str]]:
    """The images both sides see, and their names: the files of `images`, else the built-in samples."""
    if images is None:
        pics = sample_images(size)
        if anyres:  # tiling matters for non-square images: one wide, one tall
            pics = [pics[0], pics[1].resize((size * 2, size)), pics[2].resize((size, size * 3 // 2))]
        return pics, [f"sample-{i}" for i in range(len(pics))]
    folder = Path(images)
    if not folder.is_dir():
        raise LlavaGgufError(f"--images {folder} is not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise LlavaGgufError(f"--images {folder} holds no files")
    # anyres (1.6) takes any shape as it is; 1.5 gets identical square pixels on both sides
    return [load_image(str(p)) if anyres else square_image(load_image(str(p)), size) for p in files], \
        [p.name for p in files]


def _processor(source, size: int):
    """transformers' image processor for the reference, and the LLaVA-NeXT grid conflict (None if none)."""
    from transformers.models.clip import CLIPImageProcessorPil  # heavy: see the module docstring

    # the images are square at the tower's size already: only rescaling and normalising remain, with the
    # mean/std the converter wrote (CLIP's when the checkpoint has no preprocessor_config.json)
    mean, std = image_norm(source.image_config_dir)
    if not source.family.anyres:
        return CLIPImageProcessorPil(do_resize=False, do_center_crop=False, do_rescale=True, do_normalize=True,
                                     image_mean=list(mean), image_std=list(std), do_convert_rgb=True), None
    # heavy: transformers, as above
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    # the model's own grid decides (config.json: what transformers' LlavaNext unpads with and what the
    # converter wrote into the mmproj), whatever preprocessor_config.json says or leaves to defaults
    pins = source.root.get("image_grid_pinpoints")
    if not isinstance(pins, list) or not pins:
        raise LlavaGgufError("the LLaVA-NeXT config.json has no image_grid_pinpoints", "the checkpoint is incomplete")
    conflict = pinpoints_conflict(source.image_config_dir, pins)
    if (source.image_config_dir / "preprocessor_config.json").is_file():
        return LlavaNextImageProcessorPil.from_pretrained(str(source.image_config_dir), image_grid_pinpoints=pins), \
            conflict
    return LlavaNextImageProcessorPil(image_grid_pinpoints=pins, size={"shortest_edge": size},
                                      crop_size={"height": size, "width": size}, image_mean=list(mean),
                                      image_std=list(std), do_pad=True), conflict


def _greedy_answer(m: LLaVA, before: list[int], img, after: list[int], n: int) -> list[int]:
    """Our runtime's own greedy answer of `n` tokens, from the same token ids."""
    m.reset()
    m.eval_tokens(before)
    m.eval_image(img)
    m.eval_tokens(after)
    mine: list[int] = []
    for _ in range(n):
        nxt = int(np.argmax(m.last_logits()))
        mine.append(nxt)
        if len(mine) < n:
            m.eval_tokens([nxt])
    return mine
