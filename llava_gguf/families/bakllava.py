"""BakLLaVA (SkunkworksAI BakLLaVA-1, llava-hf/bakLlava-v1-hf): LLaVA-1.5's architecture and tensors with a
Mistral-7B language model. llama.cpp runs Mistral as its `llama` architecture, whose graph has no sliding
window: the results are the same up to the window (4096 tokens for Mistral-7B-v0.1). The converter records
the window as `llama.attention.sliding_window` (a key llama.cpp's llama loader ignores), our runtime caps
the context at it, and convert warns when it is shorter than the trained context (see convert/llm.py).
Only the family's name and accepted text model differ from LLaVA-1.5."""
from __future__ import annotations

from dataclasses import replace

from llava_gguf.families import llava15

FAMILY = replace(llava15.FAMILY, name="bakllava", text_models=("mistral",))
