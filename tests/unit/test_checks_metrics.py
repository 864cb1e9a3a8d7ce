"""checks/metrics.py and the pure parts of the checks: the figures verify, quality and the demo report, on
small arrays and images (no model loaded)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from llava_gguf.checks.metrics import kl_divergence, log_softmax, mean_cosine, same_top1, token_cosines
from llava_gguf.checks.reference import PAD_COLOR, pinpoints_conflict, square_image
from llava_gguf.checks.samples import sample_image
from llava_gguf.demo.run import DemoReport


def test_cosines():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]], dtype=np.float32)
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [4.0, -3.0]], dtype=np.float32)
    assert token_cosines(a, b) == pytest.approx([1.0, -1.0, 0.0])
    assert mean_cosine(a, a) == pytest.approx(1.0)
    assert mean_cosine(np.zeros((2, 3)), np.zeros((2, 3))) == 0.0  # no division by zero
    with pytest.raises(ValueError, match="shapes differ"):
        token_cosines(a, b[:2])


def test_log_softmax_is_stable_and_normalised():
    lp = log_softmax(np.array([1000.0, 1000.0, -np.inf], dtype=np.float32))
    assert lp.dtype == np.float64 and np.exp(lp).sum() == pytest.approx(1.0)
    assert lp[:2] == pytest.approx([np.log(0.5)] * 2) and np.exp(lp[2]) == 0.0


def test_kl_and_top1():
    p = log_softmax(np.array([2.0, 1.0, 0.0]))
    q = log_softmax(np.array([0.0, 1.0, 2.0]))
    assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    expected = float(np.sum(np.exp(p) * (p - q)))
    assert kl_divergence(p, q) == pytest.approx(expected) and kl_divergence(p, q) > 0
    assert same_top1(p, p) and not same_top1(p, q)


def test_square_image_pads_with_the_clip_mean_and_resizes():
    wide = Image.new("RGB", (40, 20), (255, 255, 255))
    sq = square_image(wide, 30)
    assert sq.size == (30, 30)
    assert sq.getpixel((15, 1)) == PAD_COLOR and sq.getpixel((15, 15)) == (255, 255, 255)
    same = Image.new("L", (30, 30), 7)
    assert square_image(same, 30).mode == "RGB"


def test_sample_images_are_deterministic():
    a, b = sample_image(32, seed=1), sample_image(32, seed=1)
    assert a.size == (32, 32) and a.mode == "RGB" and a.tobytes() == b.tobytes()
    assert sample_image(32, seed=2).tobytes() != a.tobytes()


def test_pinpoints_conflict(tmp_path, recwarn):
    pins = [[336, 672], [672, 336]]
    assert pinpoints_conflict(tmp_path, pins) is None  # no preprocessor_config.json
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_grid_pinpoints": [[336, 672], [672, 336]]}))
    assert pinpoints_conflict(tmp_path, pins) is None
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_grid_pinpoints": [[336, 336]]}))
    assert pinpoints_conflict(tmp_path, pins) == {"config.json": pins, "preprocessor_config.json": [[336, 336]]}
    assert any("image_grid_pinpoints" in str(w.message) for w in recwarn)


def test_demo_report_json_keeps_the_fields_that_apply_in_order():
    quiz = DemoReport("m.gguf", "mm.gguf", accuracy={"F16": {"correct": 5, "n": 5}}, cosine=0.9999, image_tokens=36,
                      q4_k_m="q.gguf", seconds=1.5)
    assert list(quiz.to_json()) == ["model", "mmproj", "accuracy", "cosine", "image_tokens", "q4_k_m", "seconds"]
    one = DemoReport("m.gguf", "mm.gguf", answer="a circle", seconds=0.5)
    assert one.to_json() == {"model": "m.gguf", "mmproj": "mm.gguf", "answer": "a circle", "seconds": 0.5}
