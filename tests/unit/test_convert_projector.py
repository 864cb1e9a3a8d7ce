"""convert/projector.py: LLaVA v1's linear projector written as the GELU pair libmtmd runs is the same map
(checked with the exact erf GELU on small random matrices), and an MLP projector passes through."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from llava_gguf.convert.checkpoint import TensorRef
from llava_gguf.convert.projector import linear_as_gelu_pair
from llava_gguf.errors import LlavaGgufError


def _ref(name: str, a: np.ndarray) -> TensorRef:
    return TensorRef(name, "F32", a.shape, Path("mm.safetensors"), -1, a.nbytes, lambda: a)


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def test_the_gelu_pair_computes_the_linear_map():
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=6).astype(np.float32)
    pair = linear_as_gelu_pair({"weight": _ref("weight", w), "bias": _ref("bias", b)})
    assert sorted(pair) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert pair["0.weight"].shape == (12, 4) and pair["2.weight"].shape == (6, 12)
    assert all(r.nbytes == r.read().nbytes and r.read().shape == r.shape for r in pair.values())
    x = rng.normal(size=(3, 4)).astype(np.float64)
    hidden = _gelu(x @ pair["0.weight"].read().T + pair["0.bias"].read())
    y = hidden @ pair["2.weight"].read().T + pair["2.bias"].read()
    np.testing.assert_allclose(y, x @ w.T + b, atol=1e-5)


def test_an_mlp_projector_is_left_as_it_is():
    proj = {"0.weight": _ref("0.weight", np.zeros((2, 2), np.float32))}
    assert linear_as_gelu_pair(proj) is proj


def test_a_linear_projector_without_bias_is_refused():
    with pytest.raises(LlavaGgufError, match="the linear projector has no bias"):
        linear_as_gelu_pair({"weight": _ref("weight", np.zeros((2, 2), np.float32))})
