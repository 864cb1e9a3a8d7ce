"""LLaVA's own code with a Mistral language model (`LlavaMistralForCausalLM`: LLaVA-Med,
microsoft/llava-med-v1.5-mistral-7b, and fine-tunes made the same way): liuhaotian.py's layout, tables and
config translation; only the family's name and accepted text model differ."""
from __future__ import annotations

from dataclasses import replace

from llava_gguf.families import liuhaotian

FAMILY = replace(
    liuhaotian.FAMILY, name="llava-original-mistral", text_models=("mistral",),
    llava_config=lambda config, clip_config: liuhaotian.llava_config(config, clip_config, "mistral"))
