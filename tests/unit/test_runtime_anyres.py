"""runtime/anyres.py: LLaVA-1.6's geometry without a model — the row count known before encoding
(count_rows, which sizes the prompt) is what packing the tiles' rows gives (pack), for any image shape."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from llava_gguf.runtime.anyres import (AnyresGeometry, count_rows, flat_pinpoints, pack, select_best_resolution,
                                       tiles)

PINS = flat_pinpoints([112, 224, 224, 112, 224, 224, 336, 112, 112, 336])
SIZE, SIDE, D = 112, 4, 3


@pytest.mark.parametrize("hw", [(170, 300), (112, 200), (200, 112), (336, 336), (50, 1000), (1000, 50), (113, 111),
                                (1, 1), (224, 224), (97, 311)])
def test_count_rows_is_what_pack_gives(hw):
    th, tw = select_best_resolution(hw, PINS)
    rows, cols = th // SIZE, tw // SIZE
    rng = np.random.default_rng(0)
    base = rng.standard_normal((SIDE * SIDE, D))
    grid = [rng.standard_normal((SIDE * SIDE, D)) for _ in range(rows * cols)]
    packed = pack(base, grid, (rows, cols), hw, np.ones(D, np.float32))
    geometry = AnyresGeometry(PINS, SIZE, SIDE, np.ones(D, np.float32))
    assert len(packed) == count_rows(hw, PINS, SIZE, SIDE) == geometry.rows(hw)
    assert len(packed) <= geometry.max_rows()
    assert np.array_equal(packed[:SIDE * SIDE], base.astype(np.float32))  # the base tile first


def test_tiles_cut_the_best_pinpoint_into_tower_sized_tiles():
    base, grid, shape = tiles(Image.new("RGB", (300, 170), (200, 10, 10)), PINS, SIZE)
    assert shape == (2, 2) and len(grid) == 4  # 224x224 keeps the most of a 300x170 image
    base, grid, shape = tiles(Image.new("RGB", (330, 100), (200, 10, 10)), PINS, SIZE)
    assert shape == (1, 3) and len(grid) == 3
    assert base.size == (SIZE, SIZE) and all(t.size == (SIZE, SIZE) for t in grid)


def test_pinpoints_are_height_width_pairs():
    assert PINS[:2] == [(112, 224), (224, 112)]
    assert select_best_resolution((100, 300), PINS) == (112, 336)
