"""LLaVA-1.6 / LLaVA-NeXT as Hugging Face transformers saves it (`LlavaNextForConditionalGeneration`,
llava-hf/llava-v1.6-*): LLaVA-1.5's tower, projector and key layouts, plus "anyres" — the image is also
seen in tiles at a resolution picked from `image_grid_pinpoints`, and the tile features are packed with
one learnt `image_newline` row per feature row. The mmproj carries the pinpoints
(`clip.vision.image_grid_pinpoints`, flattened as in the config), `clip.vision.mm_patch_merge_type =
spatial_unpad` and the newline (`model.image_newline`), as llama.cpp's loader names them. Text models:
Vicuna (LLaMA), Mistral, Nous-Hermes-2-Yi (LLaMA architecture)."""
from __future__ import annotations

from dataclasses import replace

from llava_gguf.families import llava15

FAMILY = replace(
    llava15.FAMILY,
    name="llava-1.6",
    transformers_class="LlavaNextForConditionalGeneration",
    text_models=("llama", "mistral"),
    projector=llava15.PROJECTOR + (("image_newline", "model.image_newline"),),
    # transformers < 4.52 and >= 5 keep it at the top level, 4.52 - 4.57 under `model.`
    extra_tensors=(("image_newline", "image_newline"), ("model.image_newline", "image_newline")),
    anyres=True,
)
