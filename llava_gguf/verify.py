"""`verify`: the parity check of our tests, for users. The Hugging Face checkpoint in transformers and the
converted (or quantized) GGUF pair in our runtime see the same images and the same token ids; reported:
image-embedding cosine, next-token KL divergence and top-1 agreement along transformers' greedy answer,
and whether the greedy answers are identical.

Both sides get the same pixels: an image is first made square the way LLaVA-1.5 was trained (padded
with the CLIP mean colour, as libmtmd does) and resized with PIL to the tower's resolution, so neither
side resizes again (libmtmd's resizer and PIL's differ, and llava-hf's processor would centre-crop).
The reference is built from the same `open_llava` view of the checkpoint the converter reads, so every
family and layout it converts is checked, including the original layout with its separate CLIP tower
and LLaVA v1's linear projector."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import LlavaGgufError

PROMPT = "What is in the image?"
PAD_COLOR = (122, 116, 104)  # CLIP's mean colour, LLaVA-1.5's expand-to-square background


@dataclass
class VerifyReport:
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

    def to_dict(self) -> dict:
        return asdict(self)


def square_image(image, size: int):
    """`image` padded to a square with LLaVA's background and resized (PIL, bicubic) to `size`."""
    from PIL import Image

    img = image.convert("RGB")
    w, h = img.size
    if w != h:
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), PAD_COLOR)
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return img


def sample_images(size: int, n: int = 3) -> list:
    from .tiny import sample_image

    return [sample_image(size, seed=s) for s in range(n)]


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def build_reference(source, dtype):
    """transformers' LlavaForConditionalGeneration holding the checkpoint's weights as the converter
    reads them (any family and layout), filled one tensor at a time (no second copy of the model)."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if source.family.anyres:
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration.from_pretrained(str(source.checkpoint.path), dtype=dtype).eval()
    if source.family.name in ("llava-1.5", "bakllava"):
        return LlavaForConditionalGeneration.from_pretrained(str(source.checkpoint.path), dtype=dtype).eval()
    root = source.root
    vision_cfg = {**root["vision_config"], "model_type": "clip_vision_model"}
    cfg = LlavaConfig(text_config=dict(root["text_config"]), vision_config=vision_cfg,
                      vision_feature_layer=root["vision_feature_layer"],
                      vision_feature_select_strategy=root["vision_feature_select_strategy"],
                      projector_hidden_act="gelu", image_token_id=0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LlavaForConditionalGeneration(cfg).to(dtype)  # the config's torch_dtype must not win
    finally:
        torch.set_default_dtype(old)
    refs = reference_tensors(source, model)
    if "model.multi_modal_projector.weight" in refs:  # LLaVA v1: the checkpoint's nn.Linear, not the GELU pair
        w = refs["model.multi_modal_projector.weight"]
        model.model.multi_modal_projector = torch.nn.Linear(w.shape[1], w.shape[0], dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            ref = refs.get(name)
            if ref is None:
                if "post_layernorm" in name:
                    continue  # not used by LLaVA (features come from an inner layer)
                raise LlavaGgufError(f"the reference model's {name} has no tensor in the checkpoint",
                                     "the checkpoint is incomplete")
            param.copy_(torch.from_numpy(np.ascontiguousarray(ref.read())).to(dtype).reshape(param.shape))
    return model.eval()


def verify(src: Path | str, outdir: Path | str, *, images: Path | str | None = None, clip: Path | str | None = None,
           llm: Path | str | None = None, mmproj: Path | str | None = None, tokens: int = 16,
           runtime: str = "fixed", min_cosine: float | None = None, min_top1: float | None = None,
           threads: int | None = None, reference_dtype: str = "auto") -> VerifyReport:
    """`reference_dtype`: "auto" (float32 when the model and the GGUF pair fit in available memory,
    else the language model in bfloat16 — the vision tower and projector always run in float32, so the
    image check is exact either way), "float32" or "bfloat16"."""
    if runtime not in ("fixed", "stock"):
        raise LlavaGgufError(f"--runtime {runtime!r}: choose fixed or stock")
    if reference_dtype not in ("auto", "float32", "bfloat16"):
        raise LlavaGgufError(f"--reference-dtype {reference_dtype!r}: choose auto, float32 or bfloat16")
    from .runtime.native import ENV_MTMD_VARIANT

    import sys

    if "llama_cpp" in sys.modules and os.environ.get(ENV_MTMD_VARIANT, "fixed") != runtime:
        raise LlavaGgufError(f"this process already loaded the {os.environ.get(ENV_MTMD_VARIANT, 'fixed')} libmtmd",
                             f"run --runtime {runtime} in a new process")
    os.environ[ENV_MTMD_VARIANT] = runtime  # read when the native libraries load, below
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes are not ours
    import torch
    from transformers import AutoTokenizer

    from .convert import open_llava
    from .runtime.images import load_image
    from .runtime.locate import locate_pair
    from .runtime.model import LLaVA, read_gguf_info

    source = open_llava(src, clip)
    llm_path, mm_path = locate_pair(Path(outdir), llm, mmproj)
    size = int(source.vision_hp["image_size"])
    if images is not None:
        folder = Path(images)
        if not folder.is_dir():
            raise LlavaGgufError(f"--images {folder} is not a directory")
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise LlavaGgufError(f"--images {folder} holds no files")
        # anyres (1.6) takes any shape as it is; 1.5 gets identical square pixels on both sides
        pics = [load_image(str(p)) if source.family.anyres else square_image(load_image(str(p)), size) for p in files]
        names = [p.name for p in files]
    else:
        pics = sample_images(size)
        if source.family.anyres:  # tiling matters for non-square images: one wide, one tall
            pics = [pics[0], pics[1].resize((size * 2, size)), pics[2].resize((size, size * 3 // 2))]
        names = [f"sample-{i}" for i in range(len(pics))]

    info = read_gguf_info(mm_path, "mmproj")
    if info.image_size is not None and info.image_size != size:
        raise LlavaGgufError(f"the mmproj takes {info.image_size} px images, the checkpoint {size} px",
                             "is OUTDIR converted from SRC?")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    params = source.checkpoint.total_bytes // 2  # ~parameters (f16/bf16 checkpoints)
    gguf_bytes = llm_path.stat().st_size + mm_path.stat().st_size  # loaded at the same time
    fp32_fits = params * 4 * 1.3 + gguf_bytes < _available_memory()
    if reference_dtype == "auto":
        reference_dtype = "float32" if fp32_fits else "bfloat16"
    dtype = torch.float32 if reference_dtype == "float32" else torch.bfloat16
    model = build_reference(source, dtype)
    if dtype != torch.float32:  # the image path in full precision: the tower and projector are small
        _image_path_float32(model, source)
    tok = AutoTokenizer.from_pretrained(str(source.checkpoint.path))
    before = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok.encode("USER: ", add_special_tokens=False)
    after = tok.encode(f"\n{PROMPT} ASSISTANT:", add_special_tokens=False)

    quantized_llm, quantized_mm = _quantized(llm_path), _quantized(mm_path)
    thresholds = {"cosine": min_cosine if min_cosine is not None else (0.99 if quantized_mm else 0.999),
                  "top1": min_top1 if min_top1 is not None else (0.80 if quantized_llm else 0.95)}
    report = VerifyReport(str(src), str(llm_path), str(mm_path), runtime,
                          "float32" if dtype == torch.float32 else "bfloat16 language model", names, tokens,
                          thresholds=thresholds)
    cosines, kls, top1, same = [], [], [], 0
    from .quality import log_softmax
    from .reference import image_features, token_cosines
    from transformers.models.clip import CLIPImageProcessorPil

    from .convert.mmproj import image_norm

    # the images are square at the tower's size already: only rescaling and normalising remain, with the
    # mean/std the converter wrote (CLIP's when the checkpoint has no preprocessor_config.json)
    mean, std = image_norm(source.image_config_dir)
    proc = CLIPImageProcessorPil(do_resize=False, do_center_crop=False, do_rescale=True, do_normalize=True,
                                 image_mean=list(mean), image_std=list(std), do_convert_rgb=True)
    if source.family.anyres:
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        # the model's own grid decides (config.json: what transformers' LlavaNext unpads with and what the
        # converter wrote into the mmproj), whatever preprocessor_config.json says or leaves to defaults
        pins = source.root.get("image_grid_pinpoints")
        if not isinstance(pins, list) or not pins:
            raise LlavaGgufError("the LLaVA-NeXT config.json has no image_grid_pinpoints",
                                 "the checkpoint is incomplete")
        report.grid_pinpoints_conflict = _pinpoints_conflict(source.image_config_dir, pins)
        if (source.image_config_dir / "preprocessor_config.json").is_file():
            proc = LlavaNextImageProcessorPil.from_pretrained(str(source.image_config_dir), image_grid_pinpoints=pins)
        else:
            proc = LlavaNextImageProcessorPil(image_grid_pinpoints=pins,
                                              size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                              image_mean=list(mean), image_std=list(std), do_pad=True)

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
                lp = log_softmax(p_logits[:n])
                lq = log_softmax(q_logits[:n])
                kls.append(float(np.sum(np.exp(lp) * (lp - lq))))
                top1.append(int(np.argmax(lp)) == int(np.argmax(lq)))
            # our own greedy answer
            m.reset()
            m.eval_tokens(before)
            m.eval_image(img)
            m.eval_tokens(after)
            mine = []
            for _ in range(len(greedy)):
                nxt = int(np.argmax(m.last_logits()))
                mine.append(nxt)
                if len(mine) < len(greedy):
                    m.eval_tokens([nxt])
            same += mine == greedy
    allc = np.concatenate(cosines)
    report.cosine_mean, report.cosine_min = float(allc.mean()), float(allc.min())
    report.kl_mean, report.kl_max = float(np.mean(kls)), float(np.max(kls))
    report.top1 = float(np.mean(top1))
    report.greedy_identical = same
    if report.cosine_mean < thresholds["cosine"]:
        report.failures.append(f"image-embedding cosine {report.cosine_mean:.6f} < {thresholds['cosine']}")
    if report.top1 < thresholds["top1"]:
        report.failures.append(f"top-1 agreement {report.top1:.3f} < {thresholds['top1']}")
    report.passed = not report.failures
    return report


def _pinpoints_conflict(image_config_dir: Path, pins) -> dict | None:
    """preprocessor_config.json's image_grid_pinpoints when they are not config.json's `pins` (a one-line
    warning too); None when they agree or the file has none (a plain CLIPImageProcessor config)."""
    import json

    from .errors import warn

    path = image_config_dir / "preprocessor_config.json"
    try:
        theirs = json.loads(path.read_text(encoding="utf-8")).get("image_grid_pinpoints")
    except (OSError, ValueError, AttributeError):
        return None  # no file, or one the processor load below reports
    if theirs is None or _grid(theirs) == _grid(pins):
        return None
    warn(f"preprocessor_config.json's image_grid_pinpoints {str(theirs)[:120]} differ from config.json's "
         f"{str(pins)[:120]}", "verify follows config.json, as transformers' LlavaNext model and the mmproj do")
    return {"config.json": pins, "preprocessor_config.json": theirs}


def _grid(pins) -> list | None:
    try:
        return [[int(v) for v in p] for p in pins]
    except (TypeError, ValueError):
        return None


def reference_tensors(source, model) -> dict:
    """transformers parameter name -> the checkpoint tensor (as stored: v1's nn.Linear, not the GGUF's
    GELU pair) for a reference `model` of `source`."""
    from .convert import stored_parts

    text, vision, proj = stored_parts(source)
    out = {("model.language_model." + n[len("model."):]) if n.startswith("model.") else n: r for n, r in text.items()}
    inner = "vision_model." if hasattr(model.model.vision_tower, "vision_model") else ""
    out.update({"model.vision_tower." + inner + n: r for n, r in vision.items()})
    for n, r in proj.items():
        if n == "image_newline":
            out["model.image_newline"] = r
        elif n.split(".")[0] in ("0", "2"):  # nn.Sequential(Linear, GELU, Linear)
            out[f"model.multi_modal_projector.linear_{1 if n[0] == '0' else 2}.{n.split('.')[1]}"] = r
        else:  # linear_1.*, linear_2.*, or v1's weight/bias
            out["model.multi_modal_projector." + n] = r
    return out


def _image_path_float32(model, source) -> None:
    """The vision tower, projector and image_newline of a bfloat16 reference, reloaded from the checkpoint
    in float32 (casting the bfloat16 copies back would keep their rounding)."""
    import torch

    model.model.vision_tower.float()
    model.model.multi_modal_projector.float()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, ref in reference_tensors(source, model).items():
            if key in params and not key.startswith(("model.language_model.", "lm_head.")):
                p = params[key]
                p.data = torch.from_numpy(np.ascontiguousarray(ref.read())).float().reshape(p.shape)


def _quantized(path: Path) -> bool:
    """A GGUF whose tensors are quantized (by general.file_type: anything but F32, F16, BF16)."""
    import gguf

    from .runtime.model import open_gguf

    f = open_gguf(path, "GGUF file").fields.get("general.file_type")
    if f is None:
        return not path.stem.upper().endswith(("F32", "F16", "BF16"))
    return int(f.contents()) not in (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16,
                                     gguf.LlamaFileType.MOSTLY_BF16)
