"""The Hugging Face transformers reference (fp32) that our GGUF runtime is measured against: the model
(for any family the converter reads, built from the same `open_llava` view), its pre-processing, and the
projected image rows it feeds its language model. torch and transformers are
imported inside each function: they take seconds to import and only the checks need them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from llava_gguf.convert import LlavaSource, stored_parts
from llava_gguf.errors import LlavaGgufError, warn

def load_hf_model(checkpoint: Path | str):
    import torch  # heavy: see the module docstring
    from transformers import LlavaForConditionalGeneration  # heavy
    from transformers.utils import logging as hf_logging  # heavy

    hf_logging.disable_progress_bar()
    model = LlavaForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32)
    return model.eval()


def pixel_values(checkpoint: Path | str, image):
    """HF's pre-processing with its PIL image processor (torchvision is not needed)."""
    from transformers.models.clip import CLIPImageProcessorPil  # heavy: see the module docstring

    proc = CLIPImageProcessorPil.from_pretrained(str(checkpoint))
    return proc(images=image, return_tensors="pt")["pixel_values"]


def image_features(model, pixels) -> np.ndarray:
    """The projected image rows LLaVA feeds its LLM: (n_tokens, n_embd)."""
    import torch  # heavy: see the module docstring

    cfg = model.config
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=cfg.vision_feature_layer,
                                             vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    out = getattr(out, "pooler_output", out)
    if isinstance(out, (list, tuple)):
        out = out[0]
    return out.reshape(-1, out.shape[-1]).float().numpy()


# ----------------------------------------------------------------- the reference of any converted family
PAD_COLOR = (122, 116, 104)  # CLIP's mean colour, LLaVA-1.5's expand-to-square background


def square_image(image: Image.Image, size: int) -> Image.Image:
    """`image` padded to a square with LLaVA's background and resized (PIL, bicubic) to `size`."""
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


def build_reference(source: LlavaSource, dtype):
    """transformers' model holding the checkpoint's weights as the converter reads them (any family and
    layout): the family's own transformers class when it has one, else LlavaForConditionalGeneration built
    from the resolved config and filled one tensor at a time (no second copy of the model)."""
    import torch  # heavy: see the module docstring
    import transformers  # heavy

    if source.family.transformers_class is not None:
        cls = getattr(transformers, source.family.transformers_class)
        return cls.from_pretrained(str(source.checkpoint.path), dtype=dtype).eval()
    root = source.root
    vision_cfg = {**root["vision_config"], "model_type": "clip_vision_model"}
    cfg = transformers.LlavaConfig(text_config=dict(root["text_config"]), vision_config=vision_cfg,
                                   vision_feature_layer=root["vision_feature_layer"],
                                   vision_feature_select_strategy=root["vision_feature_select_strategy"],
                                   projector_hidden_act="gelu", image_token_id=0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = transformers.LlavaForConditionalGeneration(cfg).to(dtype)  # the config's torch_dtype must not win
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


def reference_tensors(source: LlavaSource, model) -> dict:
    """transformers parameter name -> the checkpoint tensor (as stored: v1's nn.Linear, not the GGUF's
    GELU pair) for a reference `model` of `source`."""
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


def image_path_float32(model, source: LlavaSource) -> None:
    """The vision tower, projector and image_newline of a bfloat16 reference, reloaded from the checkpoint
    in float32 (casting the bfloat16 copies back would keep their rounding)."""
    import torch  # heavy: see the module docstring

    model.model.vision_tower.float()
    model.model.multi_modal_projector.float()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, ref in reference_tensors(source, model).items():
            if key in params and not key.startswith(("model.language_model.", "lm_head.")):
                p = params[key]
                p.data = torch.from_numpy(np.ascontiguousarray(ref.read())).float().reshape(p.shape)


def pinpoints_conflict(image_config_dir: Path, pins) -> dict | None:
    """preprocessor_config.json's image_grid_pinpoints when they are not config.json's `pins` (a one-line
    warning too); None when they agree or the file has none (a plain CLIPImageProcessor config)."""
    path = image_config_dir / "preprocessor_config.json"
    try:
        theirs = json.loads(path.read_text(encoding="utf-8")).get("image_grid_pinpoints")
    except (OSError, ValueError, AttributeError):
        return None  # no file, or one the processor load reports
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
