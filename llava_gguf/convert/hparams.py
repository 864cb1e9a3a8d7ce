"""Config defaults as data. llava-hf configs list only what differs from transformers' defaults
(LLaVA-1.5-7B's text_config names five keys), so the converter fills the rest from these tables —
transformers' documented defaults for each config class — instead of importing transformers (and,
through it, torch: 2 s of a 20 s conversion)."""
from __future__ import annotations

from ..errors import LlavaGgufError

# transformers LlamaConfig / MistralConfig defaults
TEXT_DEFAULTS: dict[str, dict] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                  attention_bias=False, mlp_bias=False, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, head_dim=None),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, sliding_window=4096, head_dim=None),
}

# transformers CLIPVisionConfig defaults
CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
                            num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5)

# LlavaConfig: the vision tower it assumes when vision_config is absent (CLIP ViT-L/14-336)
LLAVA_DEFAULTS = dict(vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", image_token_index=32000, multimodal_projector_bias=True)
LLAVA_VISION = dict(intermediate_size=4096, hidden_size=1024, patch_size=14, image_size=336, num_hidden_layers=24,
                    num_attention_heads=16, projection_dim=768)

_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "image_size", "patch_size")


def _check_ints(cfg: dict, where: str) -> None:
    for key in _INT_KEYS:
        if key in cfg and cfg[key] is not None and (not isinstance(cfg[key], int) or isinstance(cfg[key], bool)
                                                     or cfg[key] <= 0):
            raise LlavaGgufError(f"config.json: {where}.{key} = {cfg[key]!r} is not a positive integer",
                                 "the config is corrupt")


def resolve_llava(config: dict) -> tuple[dict, dict, dict]:
    """(root, text, vision) hyperparameters with defaults filled in. `text` is merged over the root
    (as llama.cpp's converter does), so root-level keys are visible to the text model too."""
    root = {**LLAVA_DEFAULTS, **config}
    if "image_token_id" in config and "image_token_index" not in config:
        root["image_token_index"] = config["image_token_id"]
    text_cfg = config.get("text_config") or {}
    vision_cfg = config.get("vision_config") or {}
    if not isinstance(text_cfg, dict) or not isinstance(vision_cfg, dict):
        raise LlavaGgufError("config.json: text_config and vision_config must be objects", "the config is corrupt")
    model_type = text_cfg.get("model_type", "llama")
    if model_type not in TEXT_DEFAULTS:
        raise LlavaGgufError(f"unsupported text model type {model_type!r}", f"supported: {', '.join(TEXT_DEFAULTS)}")
    text = {**root, **TEXT_DEFAULTS[model_type], **text_cfg, "model_type": model_type}
    if text.get("num_key_value_heads") is None:
        text["num_key_value_heads"] = text["num_attention_heads"]
    if text.get("head_dim") is None:
        text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if "rope_theta" in rope:
        text["rope_theta"] = rope["rope_theta"]
    vision_base = LLAVA_VISION if "vision_config" not in config else {}
    vision = {**CLIP_VISION_DEFAULTS, **vision_base, **vision_cfg}
    _check_ints(text, "text_config")
    _check_ints(vision, "vision_config")
    return root, text, vision
