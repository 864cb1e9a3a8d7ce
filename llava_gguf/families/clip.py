"""CLIP as LLaVA uses it: the image normalisation (openai/clip-vit-*), the preprocessor default when a
checkpoint names none, and where a CLIP config keeps its vision part."""
from __future__ import annotations

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_vision_config(clip_config: dict) -> dict:
    """The vision part of a CLIPModel config, or a CLIPVisionModel config itself."""
    if isinstance(clip_config.get("vision_config"), dict):
        return clip_config["vision_config"]
    return clip_config
