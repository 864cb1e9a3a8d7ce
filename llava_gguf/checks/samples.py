"""Synthetic test images: verify and quality measure on them when the user gives no images."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def sample_image(size: int, seed: int = 0):
    """A deterministic, structured RGB test image (gradients and shapes), size x size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    arr = np.stack([255 * x, 255 * y, 255 * (1 - x) * y], axis=-1)
    arr += rng.normal(0, 12, arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    s = size
    d.ellipse([s * 0.1, s * 0.1, s * 0.45, s * 0.45], fill=(220, 30, 40))
    d.rectangle([s * 0.55, s * 0.5, s * 0.9, s * 0.85], fill=(30, 60, 200))
    d.polygon([(s * 0.2, s * 0.9), (s * 0.4, s * 0.55), (s * 0.6, s * 0.9)], fill=(250, 220, 40))
    return img
