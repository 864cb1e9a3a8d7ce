"""The Hugging Face transformers reference (fp32) that our GGUF runtime is measured against."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def load_hf_model(checkpoint: Path | str):
    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = LlavaForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32)
    return model.eval()


def pixel_values(checkpoint: Path | str, image):
    """HF's pre-processing with its PIL image processor (torchvision is not needed)."""
    from transformers.models.clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil.from_pretrained(str(checkpoint))
    return proc(images=image, return_tensors="pt")["pixel_values"]


def image_features(model, pixels) -> np.ndarray:
    """The projected image rows LLaVA feeds its LLM: (n_tokens, n_embd)."""
    import torch

    cfg = model.config
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=cfg.vision_feature_layer,
                                             vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    out = getattr(out, "pooler_output", out)
    if isinstance(out, (list, tuple)):
        out = out[0]
    return out.reshape(-1, out.shape[-1]).float().numpy()


def token_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-token cosine similarity of two (n_tokens, n_embd) arrays of the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1) + 1e-30)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-token cosine similarity of two (n_tokens, n_embd) arrays of the same shape."""
    return float(token_cosines(a, b).mean())


LLAMA_CPP_PYTHON_VERSION = "0.3.36"


def llama_cpp_sdist() -> Path:
    """The pinned llama-cpp-python sdist the native build used (fetched by bin/'s set-up or the build)."""
    import os

    from .demo import cache_dir
    from .errors import LlavaGgufError

    path = Path(os.environ.get("LLAVA_GGUF_SDIST") or cache_dir() / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz")
    if not path.is_file():
        raise LlavaGgufError(f"the llama-cpp-python sdist is not at {path}",
                             "set LLAVA_GGUF_SDIST, or run ./bin/llava-gguf once to fetch it")
    return path


def llama_cpp_converter(dest: Path) -> Path:
    """llama.cpp's own convert_hf_to_gguf.py (with its conversion/ and gguf-py/), extracted from the
    same sdist our native part is built from: the anchor our LLM files are compared against."""
    import tarfile

    script = Path(dest) / "convert_hf_to_gguf.py"
    if not script.is_file():
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        with tarfile.open(llama_cpp_sdist()) as tar:
            members = [m for m in tar.getmembers() if m.name == prefix + "convert_hf_to_gguf.py"
                       or m.name.startswith((prefix + "conversion/", prefix + "gguf-py/"))]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(dest, members=members, filter="data")
    return script
