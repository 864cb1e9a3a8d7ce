"""Exports: a converted LLM + mmproj pair handed to another runtime, ready to run with vision and prompted
as our runtime prompts it. A sibling of checks/ in the layers: it reads files and the runtime's rendering
(runtime and below), and front ends call it.

- ollama.py: `export ollama`, a Modelfile (two FROM lines, a TEMPLATE, stops, num_ctx)
- lmstudio.py: `export lmstudio`, the `<publisher>/<model>/` folder with the `mmproj-` file beside the LLM
- chat_formats.py: the chat formats (Vicuna, Mistral, ChatML, LLaMA-3) as Jinja and as Ollama templates
- source.py: the pair, checked, with its chat format and names"""
from __future__ import annotations

from llava_gguf.export.lmstudio import LMStudioExport, default_models_dir, export_lmstudio
from llava_gguf.export.ollama import OllamaExport, export_ollama

__all__ = ["export_ollama", "OllamaExport", "export_lmstudio", "LMStudioExport", "default_models_dir"]
