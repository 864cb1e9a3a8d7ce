"""BakLLaVA (SkunkworksAI BakLLaVA-1, llava-hf/bakLlava-v1-hf): LLaVA-1.5's architecture and tensors with a
Mistral-7B language model. llama.cpp runs Mistral as its `llama` architecture (no sliding window: the
same results up to the window, 4096 tokens), so only the family's name and accepted text model differ."""
from __future__ import annotations

from dataclasses import replace

from . import llava15

FAMILY = replace(llava15.FAMILY, name="bakllava", text_models=("mistral",))
