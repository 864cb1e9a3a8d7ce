"""The Hugging Face transformers reference (fp32) that our GGUF runtime is measured against."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def load_hf_model(checkpoint: Path | str):
    import torch
    from transformers import LlavaForConditionalGeneration

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


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-token cosine similarity of two (n_tokens, n_embd) arrays of the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1) + 1e-30)
    return float(cos.mean())
