"""LLaVA-1.6 ("anyres") image rows exactly as transformers' LlavaNext computes them.

libmtmd in this llama.cpp treats a file with `clip.vision.image_grid_pinpoints` LLaVA-UHD style (overview
+ slices, no image_newline, no unpadding: ../shared/llava-upstream-defects.md §3), so its 1.6 rows differ
from HF's in count and content. Here the image is cut the way LlavaNextImageProcessor (PIL backend) cuts
it — best pinpoint, aspect-preserving bicubic resize, centred black padding, row-major tiles at the
tower's resolution, plus the whole image resized to one tile — each tile is encoded by libmtmd as an
ordinary square image at the tower's size (nothing left for it to resize or slice), and the tile features
are packed as LlavaNextModel.pack_image_features does: base tile, then the tile grid's feature map with
the padding removed and one `image_newline` row after each feature row."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


def select_best_resolution(original_hw: tuple[int, int], pinpoints: list[tuple[int, int]]) -> tuple[int, int]:
    """transformers.image_processing_utils.select_best_resolution: the (height, width) that keeps the most
    of the image, then wastes the least."""
    oh, ow = original_hw
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / ow, h / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        eff = min(dw * dh, ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    assert best is not None
    return best


def patch_output_size(original_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """transformers.image_processing_utils.get_patch_output_size."""
    oh, ow = original_hw
    th, tw = target_hw
    sw, sh = tw / ow, th / oh
    if sw < sh:
        return min(math.ceil(oh * sw), th), tw
    return th, min(math.ceil(ow * sh), tw)


def tiles(image, pinpoints: list[tuple[int, int]], size: int):
    """(base tile, grid tiles row-major, (rows, cols)) as PIL images of size x size."""
    img = image.convert("RGB")
    ow, oh = img.size
    th, tw = select_best_resolution((oh, ow), pinpoints)
    nh, nw = patch_output_size((oh, ow), (th, tw))
    resized = img.resize((nw, nh), Image.BICUBIC)
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(resized, ((tw - nw) // 2, (th - nh) // 2))
    grid = [canvas.crop((x, y, x + size, y + size)) for y in range(0, th, size) for x in range(0, tw, size)]
    base = img.resize((size, size), Image.BICUBIC)
    return base, grid, (th // size, tw // size)


def unpad(feature: np.ndarray, original_hw: tuple[int, int]) -> np.ndarray:
    """transformers' unpad_image on a (H, W, C) feature map."""
    oh, ow = original_hw
    ch, cw = feature.shape[:2]
    if ow / oh > cw / ch:
        new_h = int(round(oh * (cw / ow), 7))
        pad = (ch - new_h) // 2
        return feature[pad:ch - pad]
    new_w = int(round(ow * (ch / oh), 7))
    pad = (cw - new_w) // 2
    return feature[:, pad:cw - pad]


def pack(base: np.ndarray, grid: list[np.ndarray], grid_shape: tuple[int, int], original_hw: tuple[int, int],
         newline: np.ndarray) -> np.ndarray:
    """LlavaNextModel.pack_image_features for one image: rows (n, d)."""
    rows, cols = grid_shape
    side = int(round(math.sqrt(base.shape[0])))
    d = base.shape[1]
    feat = np.stack(grid).reshape(rows, cols, side, side, d)  # tile row, tile col, y, x
    feat = feat.transpose(0, 2, 1, 3, 4).reshape(rows * side, cols * side, d)
    feat = unpad(feat, original_hw)
    h, w = feat.shape[:2]
    with_newline = np.concatenate([feat, np.broadcast_to(newline, (h, 1, d))], axis=1)
    return np.concatenate([base, with_newline.reshape(h * (w + 1), d)], axis=0).astype(np.float32)


def count_rows(original_hw: tuple[int, int], pinpoints: list[tuple[int, int]], size: int, side: int) -> int:
    """How many rows `pack` gives for an image of `original_hw`, from the geometry alone (no encoding)."""
    oh, ow = original_hw
    th, tw = select_best_resolution((oh, ow), pinpoints)
    ch, cw = (th // size) * side, (tw // size) * side
    if ow / oh > cw / ch:
        h, w = ch - 2 * ((ch - int(round(oh * (cw / ow), 7))) // 2), cw
    else:
        h, w = ch, cw - 2 * ((cw - int(round(ow * (ch / oh), 7))) // 2)
    return side * side + h * (w + 1)


def flat_pinpoints(values: list[int]) -> list[tuple[int, int]]:
    return [(int(values[i]), int(values[i + 1])) for i in range(0, len(values) - 1, 2)]


@dataclass(frozen=True)
class AnyresGeometry:
    """An anyres (LLaVA-1.6) mmproj's geometry: pinpoints (height, width), tile size in pixels, feature rows
    per tile side, and the image_newline row."""

    pins: list[tuple[int, int]]
    size: int
    side: int
    newline: np.ndarray

    def rows(self, original_hw: tuple[int, int]) -> int:
        """Positions an image of this (height, width) takes."""
        return count_rows(original_hw, self.pins, self.size, self.side)

    def max_rows(self) -> int:
        """The most rows one image can take: base tile + the largest unpadded grid with newlines."""
        return max(self.side * self.side + (h // self.size) * self.side * ((w // self.size) * self.side + 1)
                   for h, w in self.pins)
