"""LLaVA as its authors' code (github.com/haotian-liu/LLaVA) saves it: `LlavaLlamaForCausalLM` /
`LlavaMistralForCausalLM` — liuhaotian/llava-v1.5-*, LLaVA-Med (microsoft/llava-med-v1.5-mistral-7b) and
most fine-tunes made with that code. A LLaMA/Mistral config with `mm_*` fields, the language model under
`model.` / `lm_head.`, the projector as `model.mm_projector.{0,2}` (an nn.Sequential: Linear, GELU,
Linear), and usually no vision tower: it is the CLIP checkpoint `mm_vision_tower` names, given with
`convert --clip DIR` or found in the local Hugging Face cache. (The Mistral variant, LlavaMistralForCausalLM,
is liuhaotian_mistral.py.) Some fine-tunes do save the tower, as
`model.vision_tower.vision_tower.vision_model.*`; then it is taken from there."""
from __future__ import annotations

from llava_gguf.errors import LlavaGgufError
from llava_gguf.families import llava15
from llava_gguf.families.clip import clip_vision_config
from llava_gguf.families.family import Family, KeyLayout
from llava_gguf.families.hparams import BOOL, STRING, check_text_types, check_types

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."

LAYOUTS = (
    KeyLayout(
        name="liuhaotian",
        text=(("model.", "model."), ("lm_head.", "lm_head.")),
        vision=VISION_PREFIX,
        projector="model.mm_projector.",
    ),
)

# nn.Sequential(Linear, GELU, Linear): indices 0 and 2, as libmtmd's mm.0 / mm.2
PROJECTOR = (
    ("0.weight", "mm.0.weight"),
    ("0.bias", "mm.0.bias"),
    ("2.weight", "mm.2.weight"),
    ("2.bias", "mm.2.bias"),
)

# LLaVA's config fields that are not the language model's
_MM_KEYS = ("mm_vision_tower", "mm_hidden_size", "mm_vision_select_layer", "mm_vision_select_feature",
            "mm_projector_type", "mm_use_im_start_end", "mm_use_im_patch_token", "mm_patch_merge_type",
            "image_aspect_ratio", "image_grid_pinpoints", "mm_projector_lr", "mm_vision_tower_lr",
            "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower", "use_mm_proj",
            "mm_resampler_type", "tokenizer_model_max_length", "tokenizer_padding_side")


# the LLaVA fields read below (mm_vision_select_layer is checked as vision_feature_layer, in mmproj.py)
_MM_TYPES = {"mm_projector_type": STRING, "image_aspect_ratio": STRING.or_null(), "mm_patch_merge_type": STRING,
             "mm_use_im_start_end": BOOL.or_null(), "mm_vision_select_feature": STRING}


def llava_config(config: dict, clip_config: dict, text_model: str) -> dict:
    """The llava-hf config this checkpoint stands for (what resolve_llava and the mmproj writer read)."""
    # checked here, where the keys sit at the top level of the file (resolve_llava sees them as text_config.*)
    check_types(config, _MM_TYPES)
    check_text_types(config, where="")
    projector = config.get("mm_projector_type", "linear")  # absent in LLaVA v1 configs: linear
    if projector not in ("mlp2x_gelu", "linear"):
        raise LlavaGgufError(f"mm_projector_type {projector!r} is not supported",
                             "supported: mlp2x_gelu (LLaVA-1.5 and its fine-tunes), linear (LLaVA v1)")
    aspect = config.get("image_aspect_ratio", "square")
    merge = config.get("mm_patch_merge_type", "flat")
    if "anyres" in str(aspect) or merge != "flat":
        raise LlavaGgufError(f"image_aspect_ratio {aspect!r} / mm_patch_merge_type {merge!r} (LLaVA-1.6 anyres) "
                             "in the original layout is not supported yet",
                             "convert the llava-hf LlavaNext checkpoint instead, when it exists")
    if config.get("mm_use_im_start_end"):
        raise LlavaGgufError("mm_use_im_start_end is set: the model expects <im_start>/<im_end> tokens around "
                             "each image, which libmtmd does not insert")
    select = config.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise LlavaGgufError(f"mm_vision_select_feature {select!r} is not supported")
    text = {k: v for k, v in config.items() if k not in _MM_KEYS and k not in ("architectures", "model_type")}
    text["model_type"] = text_model
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text,
        "vision_config": clip_vision_config(clip_config),
        "vision_feature_layer": config.get("mm_vision_select_layer", -2),
        "vision_feature_select_strategy": "default" if select == "patch" else "full",
        "projector_hidden_act": "gelu",
    }


FAMILY = Family(
    name="llava-original",
    layouts=LAYOUTS,
    vision_globals=llava15.VISION_GLOBALS,
    vision_blocks=llava15.VISION_BLOCKS,
    vision_dropped=llava15.VISION_DROPPED,
    projector=PROJECTOR,
    projector_type="mlp",
    default_chat_template=llava15.VICUNA_TEMPLATE,
    text_models=("llama",),
    external_vision=True,
    llava_config=lambda config, clip_config: llava_config(config, clip_config, "llama"),
    linear_projector=True,  # LLaVA v1 (mm_projector_type linear)
)
